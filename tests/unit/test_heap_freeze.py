"""What a service loads for good is kept out of the garbage collector's full passes
(``gc.freeze``): at start-up (``freeze_heap``) and after a lazy load that imports
modules (``freezing_imports``: a tokenizer through transformers brings torch, ~220k
objects a full collection would otherwise walk while every stream in flight waits)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_a_load_that_imports_modules_freezes_them_and_one_that_does_not_leaves_gc_alone(
        ) -> None:
    out = _run(
        "import gc\n"
        "from kvmesh.core.service_main import freezing_imports\n"
        "with freezing_imports():\n"
        "    pass\n"
        "print(gc.get_freeze_count())\n"
        "with freezing_imports():\n"
        "    import email.mime.multipart, xml.dom.minidom\n"
        "print(gc.get_freeze_count())\n")
    untouched, frozen = map(int, out.split())
    assert untouched == 0
    assert frozen > 1000


def test_loading_a_tokenizer_leaves_what_transformers_imported_frozen(
        model_dir: Path) -> None:
    """The gateway's tokenizer load (``load_tokenizer``, in a fresh interpreter): what
    it imported is frozen, so a full collection after it walks only what requests
    allocate."""
    out = _run(
        "import gc\n"
        "from pathlib import Path\n"
        "from kvmesh.gateway.tokenizers import load_tokenizer\n"
        "tokenizer = load_tokenizer(Path(" + repr(str(model_dir)) + "))\n"
        "gc.collect()\n"
        "print(gc.get_freeze_count(), len(gc.get_objects()), 'encoder' in vars(tokenizer))\n")
    frozen, walked, built = out.split()
    assert int(frozen) > 100_000, out
    assert int(walked) < int(frozen) // 4, out
    # Its Rust encoder is built by the load too (~120 ms), not by the first request.
    assert built == "True", out
