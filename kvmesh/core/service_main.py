"""What every service's ``__main__`` shares: flags → settings, run until signalled."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from kvmesh.core.malloc_tuning import tune_malloc


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON config file")
    parser.add_argument("--host", default=None, help="address to bind")
    parser.add_argument("--port", type=int, default=None, help="port to bind (0 = free port)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING")
    add_observability_flags(parser)
    return parser


def add_observability_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None, choices=["none", "otlp", "console"],
                        help="OpenTelemetry tracing: span exporter (default none: off)")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="OTLP/gRPC collector for --trace otlp (default "
                        "http://127.0.0.1:4317)")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="JSON log lines (with request_id and trace_id)")


def observability_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The tracing/logging sections the flags set (absent keys: not overridden)."""
    tracing = {k: v for k, v in {"exporter": args.trace,
                                 "otlp_endpoint": args.otlp_endpoint}.items() if v is not None}
    settings: dict[str, Any] = {}
    if tracing:
        settings["tracing"] = tracing
    if args.log_json:
        settings["logging"] = {"json_format": True}
    return settings


def freeze_heap() -> None:
    """After start-up: what is loaded by now (modules, compiled kernels, a restored
    index) lives as long as the process, so take it out of the collector's sight —
    its full passes then walk only what requests allocate, and their pauses stay
    short on latency-critical paths (CPython's gc.freeze)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def freezing_imports() -> Iterator[None]:
    """Around a lazy load (a tokenizer through transformers, vLLM's parsers): when it
    imported modules (torch and sympy come with them: ~220k objects), freeze the heap
    as ``freeze_heap`` does at start-up, without its full collection. Otherwise every
    later full collection walks them while the requests in flight wait (100-200 ms on
    these cores under load). Objects of requests alive at that moment are frozen with
    them; ending cycles among those few are never collected."""
    modules = len(sys.modules)
    yield
    if len(sys.modules) > modules:
        gc.freeze()


class Service(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


async def run_until_signalled(factory: Callable[[], Service]) -> None:
    """Build a service on the running loop (grpc.aio binds channels to it), start it,
    wait for SIGINT/SIGTERM, stop it."""
    tune_malloc()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    service = factory()
    await service.start()
    try:
        await stopped.wait()
    finally:
        await service.stop()
        from kvmesh.core.tracing import shutdown_tracing

        shutdown_tracing()  # flush the last spans


def run_service(name: str, log_level: str | None, config: Any,
                factory: Callable[[], Service]) -> None:
    """A service's whole life from its ``__main__``: its logging and tracing from
    ``config`` (its ``logging``/``tracing`` sections), then run until signalled."""
    from kvmesh.core.logs import setup_logging
    from kvmesh.core.tracing import setup_tracing

    setup_logging(name, log_level, config.logging.json_format)
    setup_tracing(config.tracing, name)
    asyncio.run(run_until_signalled(factory))


def write_ready_file(path: Path | None, payload: dict[str, Any]) -> None:
    """Atomically publish a service's bound addresses for whoever started it."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
