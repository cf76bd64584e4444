"""`kvmesh models add/remove/list`: change a running mesh's models through its admin
service (found in the state file `kvmesh up` writes, or given with ``--admin``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
from google.protobuf import json_format

from kvmesh.core.roles import role_from_proto
from kvmesh.core.settings import read_config_file
from kvmesh.launch.admin import AdminClient, parse_model
from kvmesh.launch.state import NoMeshError, read_state
from kvmesh.v1 import mesh_admin_pb2

#: How long `models add/remove` wait for the gateway's /v1/models to follow.
LISTING_TIMEOUT_S = 30.0


def _mesh(state_file: Path | None, admin: str | None) -> tuple[str, str | None]:
    """The admin address and the mesh's OpenAI base URL (None when only --admin is
    known)."""
    if admin:
        return admin, None
    state = read_state(state_file)
    if not state.get("admin"):
        raise NoMeshError("the running mesh serves no admin service (admin_port: null)")
    return str(state["admin"]), str(state["http"])


async def listed_models(client: httpx.AsyncClient, http: str) -> set[str]:
    reply = await client.get(http.rstrip("/") + "/models", timeout=5)
    reply.raise_for_status()
    return {m["id"] for m in reply.json()["data"]}


async def wait_listing(http: str, model_id: str, present: bool,
                       timeout_s: float = LISTING_TIMEOUT_S) -> float:
    """Seconds until the gateway's /v1/models lists ``model_id`` (or stops listing it)."""
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        while (model_id in await listed_models(client, http)) != present:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(
                    f"the gateway's /v1/models did not follow within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)
    return time.monotonic() - started


def _as_dict(model: mesh_admin_pb2.MeshModel) -> dict[str, Any]:
    return {"model_id": model.model_id, "config": json.loads(model.model_config_json or "{}"),
            "workers": [json_format.MessageToDict(w, preserving_proto_field_name=True)
                        for w in model.workers]}


async def add(config_file: Path, state_file: Path | None, admin: str | None,
              as_json: bool) -> int:
    model = parse_model(read_config_file(config_file))  # a bad key fails here, named
    address, http = _mesh(state_file, admin)
    added = await AdminClient(address).add(model)
    waited = await wait_listing(http, added.model_id, True) if http else None
    if as_json:
        print(json.dumps({**_as_dict(added), "listed_after_s": waited}))
    else:
        print(f"model {added.model_id} added: {len(added.workers)} worker(s)"
              + (f"; /v1/models lists it ({waited:.2f}s after the router)" if http else ""))
    return 0


async def remove(model_id: str, state_file: Path | None, admin: str | None,
                 as_json: bool) -> int:
    address, http = _mesh(state_file, admin)
    removed = await AdminClient(address).remove(model_id)
    waited = await wait_listing(http, model_id, False) if http else None
    if as_json:
        print(json.dumps({**_as_dict(removed), "unlisted_after_s": waited}))
    else:
        print(f"model {model_id} removed ({len(removed.workers)} worker(s) stopped)")
    return 0


async def show(state_file: Path | None, admin: str | None, as_json: bool) -> int:
    address, _ = _mesh(state_file, admin)
    models = await AdminClient(address).list()
    if as_json:
        print(json.dumps([_as_dict(m) for m in models]))
        return 0
    for m in models:
        roles = sorted({role_from_proto(w.role).value for w in m.workers})
        print(f"{m.model_id}\t{len(m.workers)} worker(s)\t{', '.join(roles)}")
    return 0
