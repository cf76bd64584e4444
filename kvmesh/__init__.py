"""kvmesh: an LLM serving mesh (gateway, router, vLLM workers on Ray).

The builder API, loaded on first use so ``import kvmesh`` stays light::

    import kvmesh

    app = kvmesh.build_app({"models": [{"model_id": "smol", "source": "embedded"}]})
    with app:                      # or: async with app / await app.start()
        print(app.addresses.http)  # the OpenAI API

``build_app`` returns a ``MeshApp`` (``kvmesh.launch.app``); ``MeshConfig`` and
``ModelConfig`` are the typed configs it takes (``kvmesh.core.mesh_config``,
``kvmesh.core.model_config``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmesh.core.mesh_config import MeshConfig
    from kvmesh.core.model_config import ModelConfig
    from kvmesh.launch.app import MeshAddresses, MeshApp, build_app

__all__ = ["build_app", "MeshApp", "MeshAddresses", "MeshConfig", "ModelConfig"]

_EXPORTS = {
    "build_app": "kvmesh.launch.app",
    "MeshApp": "kvmesh.launch.app",
    "MeshAddresses": "kvmesh.launch.app",
    "MeshConfig": "kvmesh.core.mesh_config",
    "ModelConfig": "kvmesh.core.model_config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
