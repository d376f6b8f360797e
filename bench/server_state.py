"""What a running pipeline holds, read from outside as an operator would: the gauges of every KV
slot, reservation, staging region and queued prompt on the gateway's and the workers' /metrics,
and each process's resident memory."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# Gauges that read 0 once no request runs: what the gateway has reserved, what each worker holds.
GATEWAY_HELD = ("splitserve_requests_in_flight", "splitserve_requests_waiting", "splitserve_decode_slots_reserved",
                "splitserve_prefill_queued_tokens")
WORKER_HELD = {
    "prefill": ("splitserve_prefill_queued_tokens", "splitserve_prefill_handoffs",
                "splitserve_prefill_staging_used_tokens"),
    "decode": ("splitserve_decode_slots_used",),
}


def log_tails(log_dir: Path) -> str:
    """What the processes said (warnings and errors only): the tail of each log in `log_dir`."""
    tails = []
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace").strip()
        if text:
            tails.append(f"--- {path.stem}\n{text[-3000:]}")
    return "\n".join(tails)


def http_json(port: int, path: str) -> dict | None:
    """A JSON page at 127.0.0.1:port, an error status's JSON body too (/health is 503 until the
    workers register); None when nothing (or no JSON) answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def gauges(port: int, names) -> dict[str, float]:
    """The samples of `names` on the /metrics page at 127.0.0.1:port, keyed "name{labels}".
    A name missing from the page is an error: a check that reads nothing would always pass."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                found[s.name + (str(s.labels) if s.labels else "")] = s.value
    missing = [n for n in names if not any(key.startswith(n) for key in found)]
    if missing:
        raise LookupError(f"/metrics on port {port} lacks {missing}")
    return found


def held(gateway_port: int, workers: dict[str, tuple[str, int]]) -> dict[str, float]:
    """Whatever is still held anywhere, by "process gauge"; empty when all is free.
    `workers`: name -> (role, metrics port)."""
    values = {f"gateway {k}": v for k, v in gauges(gateway_port, GATEWAY_HELD).items()}
    for name, (role, port) in workers.items():
        values.update({f"{name} {k}": v for k, v in gauges(port, WORKER_HELD[role]).items()})
    return {k: v for k, v in values.items() if v}


def wait_all_free(gateway_port: int, workers: dict[str, tuple[str, int]], timeout: float) -> dict[str, float]:
    """Poll until nothing is held; returns what was still held when `timeout` ran out (empty: all free)."""
    deadline = time.monotonic() + timeout
    while True:
        left = held(gateway_port, workers)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    """Resident memory of a live process (Linux), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")
