"""KV over NIXL (`--kv-transport nixl`): the decode worker reads a prompt's KV straight from the
prefill worker's registered staging into its slot, one-sided.

Tests that need NIXL itself skip where it is not installed (`pip install 'splitserve[nixl-cu13]'`,
which `make install` does where pip can); the rules around it (flags, CURVE, auto's choice, the
tcp retry) are tested everywhere. Every process that starts a NIXL agent binds UCX to loopback:
the workers do it from their --host (127.0.0.1), the test's own agents by UCX_NET_DEVICES.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
import zmq

from cluster import Cluster, offline, request_specs, stream_all, wait_for
from pair_child import pair_child
from splitserve.common import protocol as P
from splitserve.common.kv_handoff import KvSender, offered_transports
from splitserve.common.kv_transport import allocate_staging, nixl_runs, tensor_runs, ucx_net_devices
from splitserve.common.loading import load_model
from splitserve.common.request import GenerateRequest
from splitserve.common.service_config import NIXL_UNENCRYPTED, check_kv_transport, nixl_modules
from splitserve.common.zmq_util import free_port
from splitserve.gateway.workers import NoTransport, transport_between

torch.set_num_threads(1)
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # this process's agents, and the children it starts

needs_nixl = pytest.mark.skipif(not nixl_modules(), reason="NIXL is not installed: pip install 'splitserve[nixl-cu13]'")

# GQA: several KV heads, so that a layout mistake cannot hide (the multi-query `tiny` would)
N_LAYER, KVH, D, BUDGET = 3, 2, 8, 16
SHAPE = (N_LAYER, 2, BUDGET, KVH, D)  # [n_layer, 2, budget, KVH, D]
REGIONS = [(0, 5), (5, 3), (BUDGET - 4, 4), (0, BUDGET)]
SLOTS, SLOT_LEN = 3, 20

# The decode side in a process of its own: a NIXL agent with a KV pool [n_layer, 2, S, KVH, L, D]
# registered, the staging's description from MessagePack; reads each region it is told about into
# a slot and sends back the slot's bytes (head-major, as the pool holds them).
DECODE_CHILD = r"""
import sys
import msgspec, torch, zmq
from splitserve.common.kv_transport import KvImporter, NixlAgent, NixlError

torch.set_num_threads(1)
port, shape = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
sock = zmq.Context().socket(zmq.PAIR)
sock.setsockopt(zmq.RCVTIMEO, 30000)
sock.connect(f"tcp://127.0.0.1:{port}")
agent = NixlAgent("decode-child", "127.0.0.1")
pool = torch.full(shape, -1.0)
agent.register_pool(pool)
importer = KvImporter("cpu", torch.float32, agent)
desc = msgspec.msgpack.decode(sock.recv())
importer.open(desc)
importer.open(msgspec.msgpack.decode(msgspec.msgpack.encode(desc)))  # idempotent
sock.send(b"opened")
while True:
    msg = sock.recv()
    if not msg:
        break
    slot, offset, length = msgspec.msgpack.decode(msg)
    dst = pool[:, :, slot, :, :length]
    try:
        n = importer.read(desc["key"], offset, length, dst, 10.0)
    except NixlError as e:
        sock.send(msgspec.msgpack.encode(["error", str(e)]))
        continue
    sock.send_multipart([msgspec.msgpack.encode(["ok", n]), dst.contiguous().numpy().tobytes(),
                         pool[:, :, slot, :, length:].contiguous().numpy().tobytes()])
importer.close()
"""


def fill(staging, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    staging.tensor.copy_(torch.randn(SHAPE, generator=gen))


@needs_nixl
def test_a_decode_process_reads_gqa_regions_straight_into_its_slots():
    from splitserve.common.kv_transport import NixlAgent

    staging = allocate_staging(SHAPE, torch.float32, "cpu", "nixl", "prefill-n")
    staging.register_nixl(NixlAgent("prefill-n-agent", "127.0.0.1"))
    desc = staging.export()
    assert desc["transport"] == "nixl" and desc["key"] == "nixl:prefill-n" and desc["layout"] == "head_major"
    assert isinstance(desc["metadata"], bytes) and isinstance(desc["address"], int)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(desc)) == desc  # plain MessagePack: bytes and ints
    fill(staging, 0)
    pool_shape = (N_LAYER, 2, SLOTS, KVH, SLOT_LEN, D)
    try:
        with pair_child(DECODE_CHILD, ",".join(map(str, pool_shape)), timeout_s=60) as sock:
            sock.send(msgspec.msgpack.encode(desc))
            assert sock.recv() == b"opened"
            for slot, (offset, length) in enumerate(REGIONS):
                slot %= SLOTS
                sock.send(msgspec.msgpack.encode([slot, offset, length]))
                head, got, rest = sock.recv_multipart()
                assert msgspec.msgpack.decode(head) == ["ok", length * N_LAYER * 2 * KVH * D * 4]
                want = staging.tensor[:, :, offset:offset + length].transpose(2, 3)  # [n_layer, 2, KVH, n, D]
                assert got == want.contiguous().numpy().tobytes()
                assert set(np.frombuffer(rest, dtype=np.float32).tolist()) <= {-1.0} or offset != 0 or slot != 0
    finally:
        staging.close()


def test_descriptors_are_one_run_per_layer_kv_and_head():
    """What a read of n tokens asks NIXL for: n_layer * 2 * KVH runs of n * D elements on both sides,
    the sender's at its head-major staging's offsets, the slot's at the pool's."""
    pool = torch.zeros(N_LAYER, 2, SLOTS, KVH, SLOT_LEN, D)
    slot, n = 1, 5
    local = tensor_runs(pool[:, :, slot, :, :n])
    assert local.shape == (N_LAYER * 2 * KVH, 3) and set(local[:, 1]) == {n * D * 4}
    base = pool.data_ptr()
    want = [base + 4 * (((l * 2 + c) * SLOTS + slot) * KVH + h) * SLOT_LEN * D
            for l in range(N_LAYER) for c in range(2) for h in range(KVH)]
    assert local[:, 0].tolist() == want
    staging = allocate_staging(SHAPE, torch.float32, "cpu", "tcp", "w")
    storage = staging.tensor.untyped_storage().data_ptr()
    offset = 7
    remote = nixl_runs(storage + offset * D * 4, (N_LAYER, 2, KVH), (2 * KVH * BUDGET * D * 4, KVH * BUDGET * D * 4,
                                                                   BUDGET * D * 4), n * D * 4, 0)
    for (address, nbytes, _), (l, c, h) in zip(remote.tolist(), [(l, c, h) for l in range(N_LAYER) for c in range(2)
                                                                 for h in range(KVH)]):
        run = staging.tensor[l, c, offset:offset + n, h]  # [n, D]: contiguous in head-major staging
        assert run.is_contiguous() and run.data_ptr() == address and nbytes == run.numel() * 4
    with pytest.raises(ValueError, match="contiguous"):
        tensor_runs(pool[:, :, slot].transpose(-1, -2))


# ---- the rules: flags, CURVE, auto's choice (no NIXL needed) ------------------------------------


def register(role: str, host: str, transports: list[str], key: str = "") -> P.Register:
    return P.Register(role=role, worker_id=f"{role}-{host}", protocol=P.PROTOCOL_VERSION, host_id=host, gpu_uuids=[],
                      device="cpu", kv_endpoint="", kv_transports=transports, capacity=8, model_fingerprint="f",
                      dtype="float32", slot_len=64, pid=1, pid_namespace="ns", kv_public_key=key)


def test_auto_picks_nixl_across_hosts_only_where_both_have_it_and_kv_is_plain():
    both = ["shm", "nixl", "tcp"]
    assert transport_between("auto", register("prefill", "a", both), register("decode", "b", both)) == "nixl"
    assert transport_between("auto", register("prefill", "a", both), register("decode", "a", both)) == "shm"
    assert transport_between("auto", register("prefill", "a", ["shm", "tcp"]), register("decode", "b", both)) == "tcp"
    encrypted = register("decode", "b", both, key="K" * 40)
    assert transport_between("auto", register("prefill", "a", both), encrypted) == "tcp"
    with pytest.raises(NoTransport, match="encrypted"):
        transport_between("nixl", register("prefill", "a", both), encrypted)
    with pytest.raises(NoTransport, match="prefill worker offers shm, tcp"):
        transport_between("nixl", register("prefill", "a", ["shm", "tcp"]), register("decode", "b", both))


def test_offers_and_refusals(monkeypatch):
    cpu = torch.device("cpu")
    assert offered_transports("auto", cpu, nixl=False) == ["shm", "tcp"]  # auto keeps tcp without NIXL
    assert offered_transports("auto", cpu, nixl=True) == ["shm", "nixl", "tcp"]
    assert offered_transports("nixl", cpu, nixl=True) == ["nixl"]
    with pytest.raises(ValueError, match="no NIXL agent"):
        offered_transports("nixl", cpu, nixl=False)
    with pytest.raises(ValueError, match="unencrypted"):
        check_kv_transport("nixl", curve=True, needs_library=False)
    check_kv_transport("auto", curve=True, needs_library=True)
    monkeypatch.setattr("splitserve.common.service_config.nixl_modules", lambda: [])
    with pytest.raises(ValueError, match="pip install 'splitserve\\[nixl-cu13\\]'"):
        check_kv_transport("nixl", curve=False, needs_library=True)
    check_kv_transport("nixl", curve=False, needs_library=False)  # the gateway moves no KV itself


def test_ucx_follows_the_bind_address():
    assert ucx_net_devices("127.0.0.1").split(",")[0] == "lo"
    assert ucx_net_devices("127.0.0.2").split(",")[0] == "lo"
    assert ucx_net_devices("0.0.0.0") == "" and ucx_net_devices("gateway.local") == ""
    assert ucx_net_devices("198.51.100.77") == ""  # held by no interface here


@pytest.mark.parametrize("flag", ["nixl"])
def test_the_cli_refuses_nixl_under_curve(tmp_path, flag):
    keys = subprocess.run([sys.executable, "-m", "splitserve.cli", "keygen", str(tmp_path), "--name", "w"],
                          capture_output=True, text=True, timeout=60)
    assert keys.returncode == 0, keys.stderr
    for role, extra in (("gateway", []), ("prefill", ["--curve-server-key", str(tmp_path / "w.key")])):
        out = subprocess.run([sys.executable, "-m", "splitserve.cli", role, "--kv-transport", flag,
                              "--curve-secret-file", str(tmp_path / "w.key_secret"), *extra],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and NIXL_UNENCRYPTED in out.stderr, out.stderr


# ---- the sender's retry: a failed nixl read is retried once over tcp, then the request fails -----


def test_a_failed_nixl_read_is_retried_over_tcp_then_fails_and_staging_is_freed():
    ctx = zmq.Context()
    decode = ctx.socket(zmq.ROUTER)
    decode.setsockopt(zmq.RCVTIMEO, 10000)
    port = decode.bind_to_random_port("tcp://127.0.0.1")
    staging = allocate_staging(SHAPE, torch.float32, "cpu", "tcp", "p")
    fill(staging, 4)
    sender = KvSender(ctx, staging, "p", None)
    request = GenerateRequest("r1", tuple(range(5)), 4)
    job = P.Prefill(request, "d", f"tcp://127.0.0.1:{port}", "nixl")
    offset = sender.regions.alloc(5)
    sender.send(job, request, 7, "x", offset, 5)
    kinds = P.decoder(P.KvToDecode)

    def next_ready():
        while True:
            peer, msg, *frames = decode.recv_multipart()
            msg = P.decode(kinds, msg)
            if isinstance(msg, P.KvReady):  # KvStaging goes first, each time
                return peer, msg, frames

    def released():
        failed, done = sender.receive(sender.sockets[0])
        return (failed, done) if failed or done else None

    try:
        peer, ready, frames = next_ready()
        assert ready.transport == "nixl" and ready.location.staging == "nixl:p" and not frames
        decode.send_multipart([peer, P.encode(P.KvRelease("r1", offset, False, "the read timed out"))])
        time.sleep(0.3)
        assert sender.receive(sender.sockets[0]) == ([], [])  # retried, nothing reported yet
        peer, ready, frames = next_ready()  # the retry carries the KV itself, head-major
        assert ready.transport == "tcp" and ready.location.staging == staging.tcp_key
        assert frames[0] == staging.tensor[:, :, offset:offset + 5].transpose(2, 3).contiguous().numpy().tobytes()
        decode.send_multipart([peer, P.encode(P.KvRelease("r1", offset, False, "the read timed out"))])
        failed, done = wait_for(released, 10, "the second release")
        assert failed == [("r1", "KV handoff failed twice: the read timed out")] and done == []
        assert sender.regions.free_tokens == BUDGET and not sender.handoffs
    finally:
        sender.close()
        decode.close(0)
        ctx.term()


# ---- served: gateway and worker processes -------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory) -> Path:
    """Qwen2-shaped, grouped-query: several KV heads cross the handoff."""
    from test_families import VARIANTS, make_checkpoint

    model_type, fields = VARIANTS["qwen2-bias-tied-window"]
    return make_checkpoint(tmp_path_factory.mktemp("nixl-qwen2"), model_type, fields)


def kv_bytes_of(checkpoint: Path, specs: list[dict], rings: bool = False) -> int:
    """The fp32 K/V of the prompts of `specs`, every layer's whole prompt; with `rings`, a windowed
    layer's last ring only (what a decode worker reads over nixl or copies over shm)."""
    from splitserve.common.model import kv_rings
    from splitserve.common.model_config import load_model_config
    from splitserve.common.tokenizer import Tokenizer

    cfg, tokenizer = load_model_config(checkpoint), Tokenizer.from_dir(checkpoint)
    kept = kv_rings(cfg.windows, 10**9) if rings else (0,) * cfg.n_layer
    lengths = [len(tokenizer.encode(s["prompt"])) for s in specs]
    return sum(min(n, ring) if ring else n for n in lengths for ring in kept) * 2 * cfg.kv_heads * cfg.head_dim * 4


def handoff_bytes(c: Cluster, worker_id: str) -> dict[str, float]:
    role = c.workers[worker_id]["role"]
    return {t: c.metric(f"splitserve_{role}_handoff_bytes_total", worker_id, transport=t) for t in P.TRANSPORTS}


@needs_nixl
def test_nixl_gives_exactly_the_outputs_of_shm_and_tcp(home, gqa_checkpoint):
    """Greedy and seeded sampled requests over each transport; the handoff metrics show the KV went
    over the transport asked for and no other, so a silent fallback cannot pass (the decode worker's
    windowed layers take each prompt's last ring, all that tcp sends of them)."""
    specs = request_specs(9)
    sent, read = kv_bytes_of(gqa_checkpoint, specs), kv_bytes_of(gqa_checkpoint, specs, rings=True)
    assert read < sent
    outputs = {}
    for transport in ("nixl", "shm", "tcp"):
        with Cluster(home, model=str(gqa_checkpoint), kv_transport=transport) as c:
            prefill = c.add_worker("prefill", "--kv-transport", transport)
            decode = c.add_worker("decode", "--kv-transport", transport, "--num-slots", "8")
            c.wait_registered()
            outputs[transport] = stream_all(c.endpoint, specs)
            c.wait_idle()
            for worker, want in ((prefill, read if transport == "tcp" else sent), (decode, read)):
                moved = handoff_bytes(c, worker)
                assert moved == {t: want if t == transport else 0 for t in P.TRANSPORTS}, (worker, moved)
    model = load_model(gqa_checkpoint, torch.float32, torch.device("cpu"))
    assert outputs["nixl"] == outputs["shm"] == outputs["tcp"] == offline(model, specs)


@needs_nixl
@pytest.mark.parametrize("variant", ["starcoder2-window", "gptoss-sinks-clamp"], ids=["every-layer", "every-other"])
def test_windowed_layers_read_each_prompts_last_ring_over_nixl(home, tmp_path_factory, variant):
    """A windowed layer keeps only its ring of keys per slot (model.layer_keys), on every layer
    (StarCoder2) or every other one (gpt-oss, whose other layers keep whole slots): over nixl the
    decode worker reads each prompt's last ring straight from the sender's staging, the other
    layers' whole prompt, and the answers are the engine's; its handoff metric counts those bytes."""
    from test_families import VARIANTS, WINDOW, make_checkpoint

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("nixl-ring"), *VARIANTS[variant])
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    specs = request_specs(9)
    assert max(len(model.tokenizer.encode(s["prompt"])) for s in specs) > WINDOW  # some prompts outgrow the ring
    assert set(model.cfg.windows) == ({WINDOW} if variant == "starcoder2-window" else {0, WINDOW})
    with Cluster(home, model=str(checkpoint), kv_transport="nixl") as c:
        c.add_worker("prefill", "--kv-transport", "nixl")
        decode = c.add_worker("decode", "--kv-transport", "nixl", "--num-slots", "8")
        c.wait_registered()
        assert stream_all(c.endpoint, specs) == offline(model, specs)
        c.wait_idle()
        assert handoff_bytes(c, decode)["nixl"] == kv_bytes_of(checkpoint, specs, rings=True)


@needs_nixl
def test_two_host_rehearsal_moves_kv_over_nixl_with_auto(home, gqa_checkpoint):
    """Workers claiming different hosts, everything on auto: the gateway picks nixl (both have it,
    CURVE is off). The decode worker's KV endpoint is reached through a relay that counts bytes:
    only the handoff's control messages cross it, the KV itself is read over NIXL."""
    from test_multihost import Relay

    specs = request_specs(6)
    sent, read = kv_bytes_of(gqa_checkpoint, specs), kv_bytes_of(gqa_checkpoint, specs, rings=True)
    port = free_port()
    relay = Relay(("127.0.0.2", port), ("127.0.0.1", port))
    try:
        with Cluster(home, model=str(gqa_checkpoint)) as c:
            prefill = c.add_worker("prefill", "--host-id", "host-a")
            decode = c.add_worker("decode", "--host-id", "host-b", "--num-slots", "8", "--kv-port", str(port),
                                  "--advertise-host", "127.0.0.2")
            c.wait_registered()
            got = stream_all(c.endpoint, specs)
            c.wait_idle()
            for worker, want in ((prefill, sent), (decode, read)):
                assert handoff_bytes(c, worker) == {t: want if t == "nixl" else 0 for t in P.TRANSPORTS}
            assert 0 < relay.forwarded < read / 4
    finally:
        relay.close()
    assert got == offline(load_model(gqa_checkpoint, torch.float32, torch.device("cpu")), specs)


@needs_nixl
def test_agent_creation_failure_is_a_clear_error(home, tiny_dir, monkeypatch):
    """NIXL without its UCX plugin: --kv-transport nixl refuses to start and says why; auto starts
    without nixl (and so keeps tcp across hosts)."""
    env = dict(os.environ, NIXL_PLUGIN_DIR="/nonexistent", SPLITSERVE_HOME=str(home))
    cmd = [sys.executable, "-m", "splitserve.cli", "prefill", "--model", "tiny-random", "--threads", "1",
           "--gateway", f"tcp://127.0.0.1:{free_port()}"]
    out = subprocess.run([*cmd, "--kv-transport", "nixl"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "could not create a NIXL agent" in out.stderr and "UCX" in out.stderr, out.stderr
    monkeypatch.setenv("NIXL_PLUGIN_DIR", "/nonexistent")
    with Cluster(home) as c:
        prefill = c.add_worker("prefill", "--host-id", "host-a")
        decode = c.add_worker("decode", "--host-id", "host-b", "--num-slots", "2")
        c.wait_registered()
        assert stream_all(c.endpoint, request_specs(1))
        assert handoff_bytes(c, decode)["tcp"] > 0 and handoff_bytes(c, prefill)["nixl"] == 0


def stop(c: Cluster, worker_id: str, sig: int = signal.SIGSTOP) -> None:
    c.workers[worker_id]["proc"].send_signal(sig)


def in_handoff(c: Cluster, prefill: str) -> None:
    """Wait until the prefill worker has sent a KvReady that is not released yet."""
    wait_for(lambda: (c.health(prefill) or {}).get("handoffs") == 1, 60, "the KvReady to be sent")


@needs_nixl
def test_a_read_past_its_deadline_is_retried_over_tcp(home, tiny_dir, monkeypatch):
    """Over UCX's tcp transport a read needs the sender's progress: with the prefill worker
    stopped, the decode worker's read runs past its deadline. The handoff then goes over tcp,
    the request ends as if nothing happened, and the staging region is released."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("SPLITSERVE_NIXL_READ_TIMEOUT_S", "1")
    spec = request_specs(2)
    with Cluster(home, heartbeat_timeout=8.0, kv_transport="nixl") as c:
        prefill = c.add_worker("prefill", "--kv-transport", "nixl")
        decode = c.add_worker("decode", "--kv-transport", "nixl", "--num-slots", "2")
        c.wait_registered()
        want = stream_all(c.endpoint, spec[:1])  # undisturbed; also connects the agents
        stop(c, decode)
        result: list = []
        thread = threading.Thread(target=lambda: result.extend(stream_all(c.endpoint, spec[:1])))
        thread.start()
        try:
            in_handoff(c, prefill)
            stop(c, prefill)
        finally:
            stop(c, decode, signal.SIGCONT)
        time.sleep(2.5)  # the read's deadline passes, the failed release waits for the prefill worker
        stop(c, prefill, signal.SIGCONT)
        thread.join(timeout=60)
        assert result == want
        c.wait_idle()
        assert handoff_bytes(c, decode)["tcp"] > 0 and handoff_bytes(c, prefill)["tcp"] > 0


@needs_nixl
def test_a_sender_that_dies_mid_read_costs_nothing_but_time(home, tiny_dir):
    """The prefill worker is killed between sending KvReady and the decode worker's read: the read
    fails (the agent is gone), the decode worker frees the slot and unloads the agent, and the
    gateway resumes the request on the other prefill worker; the client sees the same tokens."""
    spec = request_specs(1)
    with Cluster(home, heartbeat_timeout=4.0, kv_transport="nixl") as c:
        first = c.add_worker("prefill", "--kv-transport", "nixl")
        decode = c.add_worker("decode", "--kv-transport", "nixl", "--num-slots", "2")
        c.wait_registered()
        want = stream_all(c.endpoint, spec)
        second = c.add_worker("prefill", "--kv-transport", "nixl")
        c.wait_registered(second)
        stop(c, decode)
        result: list = []
        thread = threading.Thread(target=lambda: result.extend(stream_all(c.endpoint, spec)))
        thread.start()
        try:
            victim = wait_for(lambda: next((p for p in (first, second) if (c.health(p) or {}).get("handoffs")), None),
                              60, "a KvReady to be sent")
            stop(c, victim, signal.SIGKILL)
            c.workers[victim]["proc"].wait()
        finally:
            stop(c, decode, signal.SIGCONT)
        thread.join(timeout=90)
        assert result == want
        c.workers.pop(victim)
        c.wait_idle()
        assert (c.health(decode) or {}).get("registered")


@needs_nixl
def test_a_restarted_prefill_workers_new_agent_replaces_its_stale_one(home, tiny_dir):
    """A prefill worker restarted under the same id (as compose and Kubernetes do) has a new agent
    and new staging memory: its description replaces the old one on the decode worker (the stale
    agent unloaded), and reads go to the new agent at once: no tcp retry."""
    spec = request_specs(3)
    with Cluster(home, kv_transport="nixl") as c:
        old = c.add_worker("prefill", "--kv-transport", "nixl", "--worker-id", "prefill-same")
        decode = c.add_worker("decode", "--kv-transport", "nixl", "--num-slots", "4")
        c.wait_registered()
        want = stream_all(c.endpoint, spec)
        stop(c, old, signal.SIGKILL)
        c.workers.pop(old)["proc"].wait()
        new = c.add_worker("prefill", "--kv-transport", "nixl", "--worker-id", "prefill-same")
        c.wait_registered(new)
        assert stream_all(c.endpoint, spec) == want
        c.wait_idle()
        assert handoff_bytes(c, decode)["tcp"] == 0 and handoff_bytes(c, new)["nixl"] > 0


def test_handoff_bench_writes_json_and_plot(tmp_path):
    """`splitserve bench handoff`, quick: the real sender and receiver, every transport installed."""
    import json

    out = tmp_path / "h.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "handoff", "--lengths", "16,64", "--repeats", "3",
           "--warmup", "1", "--transports", "nixl,tcp,shm", "--json", str(out), "--plot-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    want = {"tcp", "shm"} | ({"nixl"} if nixl_modules() else set())
    assert {(r["transport"], r["tokens"]) for r in doc["results"]} == {(t, n) for t in want for n in (16, 64)}
    assert all(r["ms"] > 0 and r["bytes"] == r["tokens"] * doc["kv_layout"]["bytes_per_token"] for r in doc["results"])
    assert set(doc["targets"]) == ({"16", "64"} if nixl_modules() else set())
    assert (tmp_path / "h.png").stat().st_size > 0
