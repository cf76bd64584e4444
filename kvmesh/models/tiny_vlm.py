"""A tiny Idefics3 (SmolVLM-family) vision-language model folder, for plumbing tests.

Built locally from transformers config classes and the embedded SmolLM2 tokenizer — no
hub. There are no weights: vLLM runs it with ``load_format="dummy"`` (random weights),
so outputs are noise, but shapes, token accounting and the multimodal data path
(gateway processor → protobuf tensors → vLLM's vision encoder) are the real ones.

Why Idefics3: vLLM CPU 0.32 imports its model code without torchvision (LLaVA, Qwen-VL
and Gemma 3 import transformers image processors that need it; DESIGN §7 keeps
torchvision out), and transformers 5 falls back to its PIL image processor for it.
Image splitting is off, so each image is one 128x128 tile of ``IMAGE_SEQ_LEN`` tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvmesh.models.embedded import (
    atomic_folder,
    default_cache_dir,
    is_prepared,
    prepare_embedded_chat_model,
)

log = logging.getLogger(__name__)

TINY_VLM = "tiny-idefics3"
IMAGE_SIZE = 128
PATCH_SIZE = 16
SCALE_FACTOR = 2
#: <image> tokens per image: (128/16)^2 patches, pixel-shuffled by 2x2.
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

#: ChatML (SmolLM2's) with image parts rendered as the processor's <image> marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}<image>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare_tiny_vlm(cache_dir: Path | None = None) -> Path:
    """Write (once) config, tokenizer and processor of a tiny Idefics3 model."""
    target = (cache_dir or default_cache_dir()) / TINY_VLM
    if is_prepared(target):
        return target
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    with atomic_folder(target, {}) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(prepare_embedded_chat_model()))
        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]})
        image_processor = Idefics3ImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
        )
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer,
            image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE,
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        vocab = len(tokenizer)
        config = Idefics3Config(
            vision_config=Idefics3VisionConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=1, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
            ).to_dict(),
            text_config=LlamaConfig(
                vocab_size=vocab, hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=2048, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ).to_dict(),
            scale_factor=SCALE_FACTOR,
            image_token_id=tokenizer.get_vocab()["<image>"],  # added above
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        config.architectures = ["Idefics3ForConditionalGeneration"]
        config.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    log.info("tiny VLM prepared at %s", target)
    return target
