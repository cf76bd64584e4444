"""`kvmesh up`: a whole mesh on this machine (or its workers on a Ray cluster, `kvmesh
deploy ray`), started as ``kvmesh.build_app(config)`` and run until Ctrl-C / SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from kvmesh.core.mesh_config import MeshConfig
from kvmesh.core.service_main import write_ready_file
from kvmesh.launch.app import build_app
from kvmesh.launch.state import claim, default_state_file, release


async def serve(config: MeshConfig, state_file: Path | None, verbose: bool) -> None:
    """Start the mesh, print where to send requests, run until Ctrl-C / SIGTERM.

    Its state (addresses, PIDs) goes to ``state_file`` or the default place
    (``kvmesh.launch.state``), where `kvmesh status` and `kvmesh down` find it."""
    import signal

    from rich.console import Console

    state_file = state_file or default_state_file()
    claim(state_file)
    console = Console(stderr=False)
    mesh = build_app(config, verbose=verbose)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        start = asyncio.ensure_future(mesh.start())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            # Its own clean-up (actors half started, Ray) ends before the stop below.
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return
        state = {**start.result(), "pid": os.getpid()}
        stopper.cancel()
        write_ready_file(state_file, state)
        # `kvmesh models add/remove` change the pools: the file follows.
        mesh.on_change = lambda new: write_ready_file(state_file, {**new, "pid": os.getpid()})
        console.print(
            f"[bold green]kvmesh is up[/] in {state['startup_s']}s — "
            f"{len(state['workers'])} worker(s) serving "
            f"{', '.join(sorted({w['model'] for w in state['workers']}))}"
            + "".join(f", {len(state['embedding_workers'])} embedding worker(s) serving {m}"
                      for m in sorted({w['model'] for w in state['embedding_workers']}))
            + "\n"
            f"  OpenAI API:     [bold]{state['http']}[/]\n"
            f"  gRPC Inference: {state['grpc']}\n"
            f"  router(s):      {', '.join(state.get('routers') or [state['router']])}\n"
            + (f"  admin:          {state['admin']} (`kvmesh models add/remove/list`)\n"
               if state["admin"] else "")
            + (f"  Envoy (xDS):    admin http://{state['edge']['admin']}, control plane "
               f"{state['edge']['control_plane']}, {len(state['gateways'])} gateway(s)\n"
               if state["edge"] else "")
            + f"  logs:           {state['run_dir']}\n"
            f"  state:          {state_file} (`kvmesh status`, `kvmesh down`)\n"
            "Press Ctrl-C to stop."
        )
        await stop.wait()
        console.print("stopping kvmesh ...")
    finally:
        await mesh.stop()
        release(state_file)
    console.print("kvmesh stopped.")
