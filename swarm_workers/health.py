"""The liveness check, kept free of Celery imports: a probe runs it every few seconds."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["heartbeat_age"]


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the worker's heartbeat file was touched, or None if there is none."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
