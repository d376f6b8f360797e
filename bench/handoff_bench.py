"""`splitserve bench handoff`: the KV handoff alone, per transport and prompt length, with no
forward pass: synthetic KV in a model's layout (SantaCoder's by default: 24 layers, one KV head of
128, multi-query) handed from a prefill-side KvSender in this process to a decode-side KvReceiver
in another, exactly as the workers do it.

What a row means:
- `ms`: the median handoff, as the prefill worker's `splitserve_prefill_handoff_seconds` measures
  it: KvReady sent -> KvRelease back. It includes the decode side putting the KV into a slot of a
  pool laid out as the decode worker's ([n_layer, 2, S, KVH, L, D]): a copy out of the mapped
  staging (shm), the frames' trip over the KV link and a copy (tcp), or a one-sided NIXL read
  straight into the slot (nixl); and the control messages both ways, which every transport pays.
- `p10_ms`, `p90_ms`: the spread over --repeats handoffs, after a warm-up.
- `gb_per_s`: KV bytes / median time.
- `nixl-tcp` (with --transports): nixl with UCX held to its TCP transport (UCX_TLS=tcp), what NIXL
  does between hosts with no RDMA; plain `nixl` on one host uses UCX's shared-memory transports.

Rounds go through the transports in turn (one handoff of each, then again), so that a shared
machine's slow spells fall on all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .output import add_output_args

SHAPES = {
    # n_layer, KV heads, head dim
    "santacoder": (24, 1, 128),
    "qwen2.5-coder-1.5b": (28, 2, 128),
}
DEFAULT_LENGTHS = "128,256,512,1024,2048"
RESULTS = Path(__file__).resolve().parent / "results"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="santacoder", choices=sorted(SHAPES), help="the KV layout's model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="KV dtype (the CPU serves in float32)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    p.add_argument("--transports", default="nixl,tcp,shm",
                   help="of nixl, nixl-tcp, tcp, shm (nixl ones are left out where NIXL is not installed)")
    p.add_argument("--repeats", type=int, default=30, help="handoffs measured per transport and length")
    p.add_argument("--warmup", type=int, default=3)
    add_output_args(p, plot_dir=RESULTS)


def run(args: argparse.Namespace) -> int:
    import torch

    from splitserve.common.service_config import nixl_modules

    from .output import save

    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(transports) - {"nixl", "nixl-tcp", "tcp", "shm"}
    if unknown:
        raise ValueError(f"unknown transports: {', '.join(sorted(unknown))}")
    if not nixl_modules():
        left = [t for t in transports if t.startswith("nixl")]
        if left:
            print(f"NIXL is not installed: leaving out {', '.join(left)}", file=sys.stderr)
        transports = [t for t in transports if not t.startswith("nixl")]
    n_layer, kvh, d = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    pairs = [Pair(t, (n_layer, kvh, d), dtype, max(lengths)) for t in transports]
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        for n in lengths:
            for _ in range(args.warmup):
                for pair in pairs:
                    pair.handoff(n)
            for _ in range(args.repeats):
                for pair in pairs:
                    samples.setdefault((pair.name, n), []).append(pair.handoff(n))
    finally:
        for pair in pairs:
            pair.close()
    token_bytes = n_layer * 2 * kvh * d * dtype.itemsize
    rows = []
    for (name, n), times in samples.items():
        q = statistics.quantiles(times, n=10)
        ms = statistics.median(times) * 1e3
        rows.append({"transport": name, "tokens": n, "bytes": n * token_bytes, "ms": ms, "p10_ms": q[0] * 1e3,
                     "p90_ms": q[-1] * 1e3, "gb_per_s": n * token_bytes / (ms * 1e-3) / 1e9})
    doc = {"device": "cpu (1 thread per process)", "shape": args.shape, "dtype": args.dtype,
           "kv_layout": {"n_layer": n_layer, "kv_heads": kvh, "head_dim": d, "bytes_per_token": token_bytes},
           "repeats": args.repeats, "results": rows, "targets": targets(rows)}
    print_table(doc)
    save(doc, args.json, args.plot_dir, f"handoff-cpu-{args.shape}", plot)
    return 0


def targets(rows: list[dict]) -> dict:
    """The issue's target: nixl at least as fast as tcp at every length, within 1.5x of shm."""
    ms = {(r["transport"], r["tokens"]): r["ms"] for r in rows}
    out = {}
    for n in sorted({r["tokens"] for r in rows}):
        if ("nixl", n) not in ms:
            continue
        entry = {}
        if ("tcp", n) in ms:
            entry["nixl_over_tcp"] = ms["nixl", n] / ms["tcp", n]
        if ("shm", n) in ms:
            entry["nixl_over_shm"] = ms["nixl", n] / ms["shm", n]
        entry["met"] = entry.get("nixl_over_tcp", 0) <= 1.0 and entry.get("nixl_over_shm", 0) <= 1.5
        out[str(n)] = entry
    return out


def print_table(doc: dict) -> None:
    rows = sorted(doc["results"], key=lambda r: (r["tokens"], r["transport"]))
    print(f"KV handoff, {doc['shape']} layout ({doc['kv_layout']['bytes_per_token']} bytes/token, {doc['dtype']}), "
          f"median of {doc['repeats']}")
    print(f"{'tokens':>7} {'MiB':>7} {'transport':>9} {'ms':>8} {'p10':>8} {'p90':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>7.1f} {r['transport']:>9} {r['ms']:>8.2f} {r['p10_ms']:>8.2f} "
              f"{r['p90_ms']:>8.2f} {r['gb_per_s']:>6.2f}")
    for n, t in doc["targets"].items():
        parts = [f"{k.replace('_over_', '/')} {v:.2f}" for k, v in t.items() if k != "met"]
        print(f"{n:>7} tokens: {', '.join(parts)}: target {'met' if t['met'] else 'MISSED'}")


def plot(doc: dict, path: Path) -> Path:
    from .plots import finish  # first: it picks the Agg backend (matplotlib only when a plot is drawn)

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r["transport"] for r in doc["results"]}):
        rows = sorted((r for r in doc["results"] if r["transport"] == name), key=lambda r: r["tokens"])
        x = [r["tokens"] for r in rows]
        left.errorbar(x, [r["ms"] for r in rows], marker="o", label=name,
                      yerr=[[r["ms"] - r["p10_ms"] for r in rows], [r["p90_ms"] - r["ms"] for r in rows]], capsize=3)
        right.plot(x, [r["gb_per_s"] for r in rows], marker="o", label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    left.set_ylabel("handoff ms (median, p10-p90)")
    right.set_ylabel("GB/s")
    return finish(fig, path, f"KV handoff, {doc['shape']} layout, {doc['dtype']}, {doc['device']}")


class Pair:
    """A prefill-side KvSender in this process and a decode-side receiver process, over one transport."""

    def __init__(self, name: str, layout: tuple[int, int, int], dtype, max_len: int):
        import torch
        import zmq

        from splitserve.common.kv_handoff import KvSender
        from splitserve.common.kv_transport import NixlAgent, allocate_staging

        self.name = name
        n_layer, kvh, d = layout
        env = dict(os.environ, UCX_NET_DEVICES="lo")
        if name == "nixl-tcp":
            env["UCX_TLS"] = "tcp"
        transport = "nixl" if name.startswith("nixl") else name
        self.transport = transport
        self.proc = subprocess.Popen([sys.executable, "-m", "splitserve.bench.handoff_bench", transport,
                                      f"{n_layer},{kvh},{d}", str(dtype).removeprefix("torch."), str(max_len)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint.startswith("tcp://"):
            raise RuntimeError(f"the {name} receiver did not start")
        self.staging = allocate_staging((n_layer, 2, 2 * max_len, kvh, d), dtype, "cpu", transport, f"bench-{name}")
        if transport == "nixl":
            saved = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_NET_DEVICES")}
            os.environ.update({k: v for k, v in env.items() if k in saved})
            try:
                self.staging.register_nixl(NixlAgent(f"bench-{name}-{os.getpid()}", "127.0.0.1"))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        self.staging.tensor.copy_(torch.randn(self.staging.tensor.shape).to(dtype))
        self.ctx = zmq.Context()
        self.sender = KvSender(self.ctx, self.staging, f"bench-{name}", None)
        self.count = 0

    def handoff(self, n: int) -> float:
        """One handoff of n tokens: seconds from KvReady sent to KvRelease back."""
        import zmq

        from splitserve.common import protocol as P
        from splitserve.common.request import GenerateRequest

        self.count += 1
        request = GenerateRequest(f"b{self.count}", tuple(range(n)), 1)
        offset = self.sender.regions.alloc(n)
        self.sender.send(P.Prefill(request, "bench", self.endpoint, self.transport), request, 0, "", offset, n)
        sock = self.sender.sockets[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sock.poll(1000, zmq.POLLIN):
                failed, done = self.sender.receive(sock)
                if failed:
                    raise RuntimeError(f"{self.name} handoff failed: {failed}")
                if done:
                    if done[0].transport != self.transport:
                        raise RuntimeError(f"a {self.name} handoff went over {done[0].transport}")
                    return done[0].seconds
        raise TimeoutError(f"no {self.name} release in 60 s")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sender.close()
        self.ctx.term()


def receiver(transport: str, layout: str, dtype_name: str, max_len: int) -> None:
    """The decode side: a KvReceiver and a pool shaped as the decode worker's, each arrival put into
    slot 0 the way the decode worker does it, then released. Ends when stdin closes."""
    import threading

    import torch
    import zmq

    from splitserve.common.kv_handoff import KvReceiver
    from splitserve.common.kv_transport import NixlAgent

    torch.set_num_threads(1)
    n_layer, kvh, d = (int(x) for x in layout.split(","))
    dtype = getattr(torch, dtype_name)
    pool = torch.zeros(n_layer, 2, 2, kvh, max_len, d, dtype=dtype)  # [n_layer, 2, S, KVH, L, D]
    nixl = None
    if transport == "nixl":
        nixl = NixlAgent(f"bench-decode-{os.getpid()}", "127.0.0.1", progress_thread=False)  # as a decode worker
        nixl.register_pool(pool)
    ctx = zmq.Context()
    kv = KvReceiver(ctx, "127.0.0.1", 0, "127.0.0.1", None, torch.device("cpu"), dtype, nixl)
    print(kv.endpoint, flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.is_set():
        if not kv.sock.poll(200, zmq.POLLIN):
            continue
        for arrival in kv.receive():
            n = arrival.ready.location.length
            try:
                kv.filler(arrival)(pool[:, :, 0, :, :n])
            except Exception as e:  # reported to the sender, which fails the run
                kv.answer(arrival, ok=False, message=str(e))
                continue
            kv.copied(arrival)
        kv.send_releases()  # the copies are synchronous here (CPU)
    kv.close()
    ctx.term()


if __name__ == "__main__":
    receiver(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
