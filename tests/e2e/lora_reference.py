"""vLLM's own answer for LoRA adapters: ``LLM(..., enable_lora=True)`` with a
``LoRARequest`` per adapter, greedy, on token-id prompts. Run as a script (vLLM spawns
its engine core, so the ``__main__`` guard matters); prints one JSON object:
{"base": [answer per prompt], "<adapter>": [...], ...}, an answer being
{"text", "tokens": [decoded token per position], "top": [{token: logprob} per position]}.

    python lora_reference.py MODEL_DIR SPEC.json
SPEC: {"prompts": [[ids...], ...], "adapters": {name: folder}, "max_tokens": N,
       "max_lora_rank": R, "block_size": B}
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=model_dir, enable_lora=True, max_loras=1,
              max_lora_rank=spec["max_lora_rank"], enforce_eager=True,
              block_size=spec["block_size"], max_model_len=4096, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]

    def answer(output: object) -> dict:
        out = output.outputs[0]  # type: ignore[attr-defined]
        return {"text": out.text,
                "tokens": [step[t].decoded_token for t, step in zip(out.token_ids, out.logprobs,
                                                                    strict=True)],
                "top": [{lp.decoded_token: lp.logprob for lp in step.values()}
                        for step in out.logprobs]}

    answers = {"base": [answer(o) for o in llm.generate(prompts, params)]}
    for i, (name, folder) in enumerate(sorted(spec["adapters"].items()), start=1):
        outputs = llm.generate(prompts, params, lora_request=LoRARequest(name, i, folder))
        answers[name] = [answer(o) for o in outputs]
    print("REFERENCE " + json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
