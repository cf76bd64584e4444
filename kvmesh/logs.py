"""Process-wide logging setup (services call this once in their __main__)."""

from __future__ import annotations

import logging
import os


def setup_logging(service: str, level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("KVMESH_LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
