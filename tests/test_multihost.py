"""A multi-host rehearsal on one machine: the gateway, a prefill worker and decode workers as
separate processes, the workers claiming host ids. Workers that claim one host move KV through
/dev/shm; a decode worker that claims another host gets it over the `tcp` transport. Each decode
worker's KV endpoint is reached through a relay on a loopback address of its own that counts the
bytes, which shows where the KV went: in the tcp run every prompt's KV crosses it, in the
single-host run only the handoff's control messages do. Greedy outputs must not differ.

The processes also serve the deployment files' assumptions: the metric names that
deploy/k8s/prometheus-adapter.yaml reads, and deploy/healthcheck.py's view of /health.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from splitserve.client import Client
from splitserve.common.model_config import load_model_config
from splitserve.common.tokenizer import Tokenizer
from splitserve.common.zmq_util import free_port

PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n\tprint(i)\n"]
MAX_NEW_TOKENS = 12
HEALTHCHECK = Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"


class Relay:
    """Forwards TCP connections from `listen` to `target`, counting the bytes sent toward `target`."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        try:
            self.server = socket.create_server(listen)
        except OSError as e:  # Linux routes all of 127.0.0.0/8 to loopback; other systems may not
            pytest.skip(f"cannot listen on {listen[0]}: {e}")
        self.target = target
        self.forwarded = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self.lock:
                        self.forwarded += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.server.close()


def generate_all(endpoint: str) -> list[list[int]]:
    with Client(endpoint) as client:
        return [client.generate(p, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, timeout=60).token_ids
                for p in PROMPTS]


def metric_names(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {s.name for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}


def healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workers_on_two_hosts_move_kv_over_tcp_and_match_one_host(home, tiny_dir):
    cfg = load_model_config(tiny_dir)
    tokenizer = Tokenizer.from_dir(tiny_dir)
    kv_bytes = sum(len(tokenizer.encode(p)) for p in PROMPTS) * cfg.n_layer * 2 * cfg.kv_heads * cfg.head_dim * 4
    same_port, other_port = free_port(), free_port()
    same = Relay(("127.0.0.3", same_port), ("127.0.0.1", same_port))
    other = Relay(("127.0.0.2", other_port), ("127.0.0.1", other_port))
    try:
        with Cluster(home) as c:
            prefill = c.add_worker("prefill", "--host-id", "host-a")
            # Routing prefers the decode worker with the most free slots: the single-host one
            # takes every request until it is gone.
            single = c.add_worker("decode", "--host-id", "host-a", "--num-slots", "8", "--kv-port", str(same_port),
                                  "--advertise-host", "127.0.0.3")
            # --kv-transport tcp: with NIXL installed, auto would read the KV over nixl (tests/test_nixl.py)
            remote = c.add_worker("decode", "--host-id", "host-b", "--num-slots", "1", "--kv-port", str(other_port),
                                  "--advertise-host", "127.0.0.2", "--kv-transport", "tcp")
            c.wait_registered()

            one_host = generate_all(c.endpoint)
            assert 0 < same.forwarded < kv_bytes / 4  # control messages only: the KV went through /dev/shm
            assert other.forwarded == 0

            proc = c.workers.pop(single)["proc"]
            proc.terminate()  # drains: the gateway stops routing to it before it exits
            assert proc.wait(timeout=30) == 0
            two_hosts = generate_all(c.endpoint)
            assert two_hosts == one_host
            assert other.forwarded >= kv_bytes  # every prompt's KV crossed the "network"

            # what the HPA rules read, and what the containers' health check sees
            assert "splitserve_requests_waiting" in metric_names(c.port)
            assert {"splitserve_prefill_queued_tokens", "splitserve_prefill_staging_used_tokens",
                    "splitserve_prefill_staging_tokens"} <= metric_names(c.workers[prefill]["metrics_port"])
            assert {"splitserve_decode_slots_used", "splitserve_decode_slots_total"} <= metric_names(
                c.workers[remote]["metrics_port"])
            check = healthcheck()
            assert check.main([str(c.workers[remote]["metrics_port"])]) == 0
            assert check.main([str(c.port)]) == 0
            assert check.main([str(free_port())]) == 1
    finally:
        same.close()
        other.close()
