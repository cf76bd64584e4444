"""Models on the Hugging Face Hub: ``hf://org/name[@revision]``, or plain ``org/name``.

The standard HF cache is this source's node cache: huggingface_hub already fetches each
file once per node under a file lock, into ``.incomplete`` blobs that it resumes and
renames when complete, with a progress bar, and every HF tool on the machine shares it.
Its own environment applies as everywhere else: ``HF_TOKEN`` (gated and private repos),
``HF_HOME``/``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (no network: only
what is cached already).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.cache import MODEL_MARKERS

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
#: Copies of the weights vLLM never loads from a folder: skip their gigabytes.
_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "coreml/*", "*.msgpack", "*.h5", "*.tflite",
           "*.ot", "original/*"]


def parse_hf_ref(ref: str) -> tuple[str, str | None] | None:
    """``hf://org/name@rev`` or ``org/name`` → (repo id, revision); None if it is neither."""
    explicit = ref.startswith("hf://")
    repo_id, _, revision = ref.removeprefix("hf://").partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        if explicit:
            raise ModelNotFoundError(f"{ref}: not a Hugging Face repo id (hf://org/name[@rev])")
        return None
    return repo_id, revision or None


class HfModelSource:
    """A hub repo → its snapshot folder in the HF cache (downloaded unless offline)."""

    def resolve(self, ref: str) -> Path:
        parsed = parse_hf_ref(ref)
        if parsed is None:
            raise ModelNotFoundError(f"{ref}: not a Hugging Face repo id (hf://org/name[@rev])")
        repo_id, revision = parsed
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        cache = constants.HF_HUB_CACHE
        try:
            path = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=_IGNORE))
        except LocalEntryNotFoundError as exc:
            log.debug("HF cache", exc_info=exc)
            if constants.is_offline_mode():
                raise ModelNotFoundError(
                    f"{ref}: offline mode (HF_HUB_OFFLINE=1) and not in the Hugging Face cache "
                    f"at {cache}; download it once with network access (`hf download "
                    f"{repo_id}`) or unset HF_HUB_OFFLINE") from None
            raise ModelNotFoundError(
                f"{ref}: the Hub cannot be reached and the Hugging Face cache at {cache} does "
                "not hold it") from None
        except GatedRepoError:
            raise ModelNotFoundError(
                f"{ref}: gated repo; accept its terms on the Hub and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(
                f"{ref}: no such repo (a private one needs HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise ModelNotFoundError(f"{ref}: no revision {revision!r} in {repo_id}") from None
        except HfHubHTTPError as exc:
            raise ModelNotFoundError(f"{ref}: the Hub answered {exc}") from None
        if not any((path / marker).is_file() for marker in MODEL_MARKERS):
            raise ModelNotFoundError(
                f"{ref}: not a model or LoRA adapter repo (no {' or '.join(MODEL_MARKERS)})")
        return path
