"""Two models' tokenizers loading at once in the gateway (a fresh process each time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import asyncio, sys
from pathlib import Path
from kvmesh.gateway.tokenizers import load_tokenizer

async def main():
    loaded = await asyncio.gather(*[asyncio.to_thread(load_tokenizer, Path(p))
                                    for p in sys.argv[1:]])
    print([len(t.encode("hello world", True)) for t in loaded])

asyncio.run(main())
"""


def test_concurrent_first_loads_in_a_fresh_process(model_dir: Path) -> None:
    # transformers' lazy imports race when two threads import it first; the gateway
    # meets this whenever a chat and an embedding model come up together.
    from kvmesh.models.embedded import prepare_embedded_embedding_model

    folders = [str(model_dir), str(prepare_embedded_embedding_model())]
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, *folders], capture_output=True, text=True,
            timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        # SmolLM2 adds no special tokens; BERT adds [CLS] and [SEP].
        assert result.stdout.strip() == "[2, 4]"
