"""LoRA adapters for the embedded SmolLM2, made here with PEFT (no downloads).

Rank 8 on the attention projections, every weight drawn from a fixed seed, and
``lora_B`` non-zero (PEFT starts it at zero, which would change nothing): greedy
output with the adapter differs from the base model's.
"""

from __future__ import annotations

from pathlib import Path

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model_dir: Path, out: Path, seeds: dict[str, int]) -> dict[str, Path]:
    """One adapter folder per name under ``out`` (adapter_config.json + safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(mean=0.0, std=0.3)
        folder = out / name
        model.save_pretrained(str(folder))
        made[name] = folder
    return made
