"""Where sqlm keeps what it builds once and reuses: ``$SQLM_CACHE`` (default ``~/.cache/sqlm``)."""

from __future__ import annotations

import os
from pathlib import Path


CACHE_ENV = "SQLM_CACHE"


def cache_dir(*parts: str) -> Path:
    """``$SQLM_CACHE/<parts...>``, or ``~/.cache/sqlm/<parts...>`` when the variable is unset or empty."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sqlm", *parts)
