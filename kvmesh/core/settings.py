"""How every kvmesh process reads its one settings model.

Precedence, highest first: command-line flags, environment (``KVMESH_<SERVICE>_...``,
nested with ``__``), the YAML/JSON config file, defaults. ``ServiceSettings`` is the
base of each process's model (``kvmesh.core.config``); ``load_settings`` builds one.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvmesh.core.security_config import REVEAL_SECRETS

#: Every service binds loopback unless its config says otherwise.
DEFAULT_HOST = "127.0.0.1"

# (settings class being loaded, its file's data): nested settings models must not
# read their parent's file as their own.
_FILE_DATA: contextvars.ContextVar[tuple[type, dict[str, Any]] | None] = contextvars.ContextVar(
    "kvmesh_config_file_data", default=None
)

class _FileSource(PydanticBaseSettingsSource):
    """Settings from the config file given to :func:`load_settings`."""

    def _data(self) -> dict[str, Any]:
        current = _FILE_DATA.get()
        if current is None or current[0] is not self.settings_cls:
            return {}
        return current[1]

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data())


class ServiceSettings(BaseSettings):
    """A process's settings: flags > environment > config file > defaults."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


S = TypeVar("S", bound=BaseSettings)


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    return data


def load_settings(cls: type[S], config_file: Path | None = None, **flags: Any) -> S:
    """Build ``cls`` from flags (None means unset) > environment > file > defaults."""
    token = _FILE_DATA.set((cls, read_config_file(config_file)))
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _FILE_DATA.reset(token)


def dump_settings(settings: BaseModel, path: Path) -> Path:
    """Write a resolved config for a child process (read back with load_settings). It
    holds the child's secrets (internal token, API keys) in clear, so only its owner
    may read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(
        settings.model_dump(mode="json", context=REVEAL_SECRETS), indent=2))
    return path
