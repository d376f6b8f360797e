"""One log format for every process, with the process's role in each line."""

from __future__ import annotations

import logging
import os


def setup_logging(role: str) -> None:
    level = os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")
