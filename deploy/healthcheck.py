"""Container health check: exit 0 when a splitserve process here answers 200 on /health.

`python healthcheck.py PORT...` tries the given ports. With none it tries a frontend's (or the
gateway's) HTTP port ($SPLITSERVE_PORT, default 8080) and a worker's or the router's metrics port
($SPLITSERVE_METRICS_PORT, default 9090): the same image runs each, and one of them listens.
Standard library only, so a check every few seconds costs no torch import.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:  # refused, timed out, or an error status (503 while unregistered or draining)
        return False


def main(ports: list[str]) -> int:
    ports = ports or [os.environ.get("SPLITSERVE_PORT", "8080"), os.environ.get("SPLITSERVE_METRICS_PORT", "9090")]
    return 0 if any(healthy(p) for p in ports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
