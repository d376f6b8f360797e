"""The served pipeline: real gateway and worker processes on 127.0.0.1, real sockets."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from cluster import Cluster, offline, request_specs, serve_process, spawn, stream_all, wait_for
from conftest import load_cpu
from splitserve.bench.traffic import PROMPTS
from splitserve.client import Client, GenerationError, GenerationTimeout
from splitserve.common import protocol as P
from splitserve.common.request import GenerateRequest
from splitserve.common.worker_link import GatewayLink
from splitserve.common.zmq_util import free_port


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_cpu(tiny_dir)


@pytest.fixture(scope="module")
def cluster(home, tiny_dir):
    with Cluster(home) as c:
        c.add_worker("prefill")
        c.add_worker("prefill")
        c.add_worker("decode", "--num-slots", "32")
        c.add_worker("decode", "--num-slots", "32")
        c.wait_registered()
        yield c


def test_64_concurrent_streams_match_offline(cluster, lm):
    specs = request_specs(64)
    assert stream_all(cluster.endpoint, specs) == offline(lm, specs)
    cluster.wait_idle()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_transports_give_identical_outputs(home, tiny_dir, lm, transport):
    specs = request_specs(12)
    with Cluster(home, kv_transport=transport) as c:
        c.add_worker("prefill", "--kv-transport", transport)
        c.add_worker("decode", "--kv-transport", transport, "--num-slots", "8")
        c.wait_registered()
        assert stream_all(c.endpoint, specs) == offline(lm, specs)
        c.wait_idle()


def test_decode_worker_added_mid_run_gets_requests(home, tiny_dir):
    with Cluster(home) as c:
        c.start_pipeline(2)
        done = threading.Event()
        errors = []

        def load() -> None:
            with Client(c.endpoint) as client:
                while not done.is_set():
                    try:
                        threads = [threading.Thread(target=client.generate, args=("def f(x):",),
                                                    kwargs={"max_new_tokens": 24, "timeout": 60}) for _ in range(4)]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(e)

        traffic = threading.Thread(target=load)
        traffic.start()
        try:
            late = c.add_worker("decode", "--num-slots", "2")
            c.wait_registered(late)
            wait_for(lambda: (c.health(late) or {}).get("admitted", 0) > 0, 60, "the new worker to get requests")
        finally:
            done.set()
            traffic.join()
        assert not errors


def test_cancels_free_every_slot_and_staging_region(cluster):
    with Client(cluster.endpoint) as client:
        def cancel_one(i: int) -> None:
            kind = i % 3
            if kind == 0:  # the client closes the stream
                stream = client.stream(PROMPTS[i % 6], max_new_tokens=200, ignore_eos=True)
                for n, _ in enumerate(stream):
                    if n == 2:
                        break
                stream.close()
            elif kind == 1:  # a stop string ends it
                client.generate(PROMPTS[i % 6], max_new_tokens=200, stop=[" ", "e", "a"], ignore_eos=True)
            else:  # the deadline passes
                with pytest.raises(GenerationTimeout):
                    client.generate(PROMPTS[i % 6], max_new_tokens=1500, ignore_eos=True, timeout=0.3)

        errors = []

        def run(i: int) -> None:
            try:
                cancel_one(i)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        for batch in range(10):
            threads = [threading.Thread(target=run, args=(batch * 20 + i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        cluster.wait_idle(timeout=60)
        # Every reservation is back at the gateway: a full set of long requests is admitted at once.
        specs = [{"prompt": "x = 1", "max_new_tokens": 3, "ignore_eos": True}] * 64
        results = stream_all(cluster.endpoint, specs)
        assert all(len(r) == 3 for r in results)


def test_garbage_on_every_socket_is_dropped(cluster, lm):
    ctx = zmq.Context()
    decode = next(w for w, info in cluster.workers.items() if info["role"] == "decode")
    kv_endpoint = cluster.health(decode)["kv_endpoint"]
    endpoints = [cluster.endpoint, f"tcp://127.0.0.1:{cluster.worker_port}", kv_endpoint]
    rng = random.Random(0)
    payloads = [b"", b"\x00", b"\xff" * 64, b"\x92\xa8Generate\xc0", b"\x93\xa6Cancel\x01\x02", rng.randbytes(1000),
                b"\x96\xa7Prefill" + rng.randbytes(200), b"\x82\xa4kind\xa8KvReady\xa1x\x01"]
    socks = []
    for endpoint in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for p in payloads:
            sock.send_multipart([p, b"extra frame"] if p else [b"", b""])
            sock.send(p)
        socks.append(sock)
    specs = request_specs(8)
    assert stream_all(cluster.endpoint, specs) == offline(lm, specs)
    for sock in socks:
        sock.close()
    ctx.term()


def live_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(entry))
            except OSError:
                continue
    return out


def test_serve_gives_each_worker_a_gpu_of_its_own_while_there_are_enough(monkeypatch):
    """--device auto spreads serve's workers (prefill first) over the GPUs; before, all of them took
    the first GPU and the others idled. A device the flag names is every worker's."""
    import torch

    from splitserve.commands.serve import visible_gpus, worker_devices
    from splitserve.common.runtime import resolve_device

    assert worker_devices("auto", 8, 3) == ["auto:0", "auto:1", "auto:2"]
    assert worker_devices("auto", 2, 3) == ["auto:0", "auto:1", "auto:0"]
    assert worker_devices("auto", 0, 2) == ["auto", "auto"]
    assert worker_devices("cuda:3", 8, 2) == ["cuda:3", "cuda:3"]
    assert worker_devices("cpu", 8, 2) == ["cpu", "cpu"]
    assert resolve_device("auto:1") == torch.device("cuda", 1 % torch.cuda.device_count()) \
        if torch.cuda.is_available() else torch.device("cpu")
    for listed, count in (("2,5", 2), ("0,-1,3", 1), ("-1", 0), ("", 0), ("GPU-8f2e,GPU-11aa", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert visible_gpus() == count, listed


def test_workers_sharing_a_gpu_start_one_after_another():
    """Each sizes its memory from what the GPU has free as it starts: started together, they would
    each count the others' share as their own."""
    from splitserve.commands.serve import next_in_turn

    one_gpu = [("auto:0", False, False), ("auto:0", False, False)]
    assert next_in_turn(one_gpu) == [0]
    assert next_in_turn([("auto:0", True, False), ("auto:0", False, False)]) == []  # the first not registered yet
    assert next_in_turn([("auto:0", True, True), ("auto:0", False, False)]) == [1]
    assert next_in_turn([("auto:0", False, False), ("auto:1", False, False), ("auto:0", False, False)]) == [0, 1]
    assert next_in_turn([("cuda", False, False), ("cuda", False, False)]) == [0]
    assert next_in_turn([("auto", False, False), ("cpu", False, False), ("cpu", False, False)]) == [0, 1, 2]


def test_serve_starts_workers_sharing_a_gpu_in_turn(home, tiny_dir, monkeypatch):
    """One GPU to serve's eyes (here PyTorch finds none, and `auto:0` is the CPU): its prefill and
    decode workers start one after the other, and serve is ready and answers."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with serve_process(home) as (_, lines):
        endpoint = next(line for line in lines if "ZMQ clients" in line).split()[-1]
        with Client(endpoint) as client:
            assert client.generate("def f():", max_new_tokens=3).finish_reason in ("length", "eos_token")


def test_serve_drains_on_sigterm_and_leaves_no_child(home, tiny_dir):
    zmq_port = free_port()
    env = dict(os.environ, SPLITSERVE_HOME=str(home), PYTHONUNBUFFERED="1", SPLITSERVE_LOG_LEVEL="WARNING")
    serve = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "serve", "--model", "tiny-random",
                              "--zmq-port", str(zmq_port), "--worker-port", "0", "--port", "0", "--threads", "2"],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "ZMQ clients" in serve.stdout.readline(), 120, "serve to be ready", interval=0)
        children = live_children(serve.pid)
        assert len(children) == 2
        with Client(f"tcp://127.0.0.1:{zmq_port}") as client:
            stream = client.stream("def f(x):", max_new_tokens=300, ignore_eos=True)
            first = next(iter(stream))
            serve.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert 1 + len(rest) == 300 and rest[-1].finish_reason == "length" and first.index == 0
        assert serve.wait(timeout=60) == 0
        assert all(not os.path.exists(f"/proc/{c}") or open(f"/proc/{c}/stat").read().split()[2] == "Z"
                   for c in children)
        assert not [f for f in os.listdir("/dev/shm") if f"-{serve.pid}-" in f]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_mismatched_worker_is_refused_with_a_clear_reason(home, tiny_dir):
    with Cluster(home) as c:
        wid = c.add_worker("decode", "--max-total-tokens", "512")
        proc = c.workers[wid]["proc"]
        assert proc.wait(timeout=120) == 1


def test_workers_register_again_after_a_gateway_restart(home, tiny_dir):
    with Cluster(home, heartbeat_timeout=1.0) as c:
        c.start_pipeline(4)
        c.gateway.send_signal(signal.SIGKILL)
        c.gateway.wait()
        wait_for(lambda: not any((c.health(w) or {}).get("registered") for w in c.workers), 30,
                 "workers to notice the gateway is gone")
        c.start_gateway()
        c.wait_registered()
        with Client(c.endpoint) as client:
            assert len(client.generate("def f(x):", max_new_tokens=5, ignore_eos=True, timeout=60).token_ids) == 5


def test_a_silent_decode_worker_is_dropped_and_traffic_goes_on(home, tiny_dir):
    with Cluster(home, heartbeat_timeout=1.0) as c:
        c.add_worker("prefill")
        stopped = c.add_worker("decode", "--num-slots", "4")
        c.add_worker("decode", "--num-slots", "4")
        c.wait_registered()
        c.workers[stopped]["proc"].send_signal(signal.SIGSTOP)
        try:
            with Client(c.endpoint) as client:
                def served() -> bool:
                    try:
                        return len(client.generate("def f(x):", max_new_tokens=5, ignore_eos=True, timeout=30).token_ids) == 5
                    except GenerationError:  # routed to the stopped worker before the gateway noticed
                        return False

                wait_for(served, 30, "the gateway to route around the silent worker")
                assert all(served() for _ in range(6))
        finally:
            c.workers[stopped]["proc"].send_signal(signal.SIGCONT)


def test_a_draining_worker_hears_that_nothing_more_comes_only_from_a_router_that_knows_it_drains(cluster, lm):
    """A worker's drain ends once the router, in a heartbeat, has no work of its own on its way to
    it. A heartbeat sent before the router had heard the worker say it drains does not count: the
    router could route it a prompt right after, which the worker, gone, would lose (found in a
    storm: such prompts were resumed only after the worker's silence, 2 s later)."""
    register = P.Register("prefill", f"prefill-probe-{os.getpid()}", P.PROTOCOL_VERSION, "host", [], "cpu", "", ["shm"],
                          1 << 20, lm.fingerprint(), "float32", 0, os.getpid(), "pid:0")
    ctx = zmq.Context()
    link = GatewayLink(ctx, f"tcp://127.0.0.1:{cluster.worker_port}", register, list, 0.5, 60)
    try:
        wait_for(lambda: link.receive() == [] and link.registered, 30, "the router to register the probe")
        since = time.monotonic()  # the drain begins; the router does not know yet
        wait_for(lambda: link.receive() == [] and link.load_heard_at > since, 10, "a router heartbeat")
        assert link.gateway_load == 0 and not link.nothing_on_the_way(since)
        link.send(P.Heartbeat(0, draining=True))
        wait_for(lambda: link.receive() == [] and link.nothing_on_the_way(since), 10, "the router to know it drains")
    finally:
        link.close()
        ctx.term()


@pytest.fixture(scope="module")
def slow_model(tiny_dir, tmp_path_factory):
    """A random GPTBigCode of 768 x 8 layers: a prompt of SLOW_PROMPT takes it seconds to prefill
    on one thread here."""
    import json

    from splitserve.common.random_checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("slow-model")
    write_random_checkpoint(path, json.loads((tiny_dir / "config.json").read_text()) | dict(n_embd=768, n_layer=8),
                            seed=0, progress=False)
    return path


SLOW_PROMPT = PROMPTS[0] * 190  # 1,900 tokens


def test_a_prefill_longer_than_the_heartbeat_timeout_is_not_taken_for_a_dead_worker(home, slow_model):
    """A prefill batch blocks the worker's loop for as long as it computes: a long prompt on a CPU,
    seconds. A thread beats meanwhile; before, the router dropped the worker as silent after its
    heartbeat timeout (2 s by default) and the request failed with "stopped responding" (found
    serving a 150M-parameter model on this machine: every prompt of 1,900 tokens failed so)."""
    beats = ("--heartbeat-interval", "0.1")
    with Cluster(home, model=str(slow_model), heartbeat_timeout=0.6, heartbeat_interval=0.1) as c:
        c.start_pipeline(2, *beats)
        with Client(c.endpoint) as client:
            t0 = time.monotonic()
            got = client.generate(SLOW_PROMPT, max_new_tokens=2, ignore_eos=True, timeout=120)
            took = time.monotonic() - t0
        assert got.finish_reason == "length" and len(got.token_ids) == 2
        assert took > 2 * c.heartbeat_timeout, "the prefill was too short to test anything"


def test_a_long_prompt_in_pieces_lets_the_prompts_after_it_through(home, slow_model):
    """--prefill-chunk-tokens: a long prompt is prefilled over several passes; a prompt that fits
    most of a chunk, one that takes a few pieces and one that takes more than half of what the long
    one has left, sent while it is, get their whole answers before the long one's first token
    (before, one pass computed the long prompt whole and the others waited for it; then the
    largest of them waited for its last piece); the answers are the engine's. A long prompt's
    pieces go into the prefix cache as they are computed, and stay there when it is cancelled
    between them (an editor's next keystroke reuses them); it leaves no staging held. A prompt
    whose prompt logprobs are asked for is prefilled whole."""
    short = {"prompt": PROMPTS[1] * 16, "max_new_tokens": 3, "ignore_eos": True}  # 111 tokens
    medium = {"prompt": PROMPTS[3] * 14, "max_new_tokens": 3, "ignore_eos": True}  # 294 tokens
    large = {"prompt": PROMPTS[4] * 55, "max_new_tokens": 3, "ignore_eos": True}  # 1,045 tokens
    long = {"prompt": SLOW_PROMPT, "max_new_tokens": 2, "ignore_eos": True}
    with Cluster(home, model=str(slow_model)) as c:
        c.start_pipeline(2, "--prefill-chunk-tokens", "128")
        prefill = next(wid for wid, w in c.workers.items() if w["role"] == "prefill")

        def in_pieces() -> bool:  # its first piece ran (its staging region is held), not its last
            h = c.health(prefill) or {}
            held = h.get("staging_free_tokens", 0) < h.get("staging_tokens", 0)
            return h.get("queued_tokens", 0) > 0 and held and not h["handoffs"]

        with Client(c.endpoint) as client:
            long_stream = client.stream(**long, timeout=120)
            long_tokens: list[tuple[float, int]] = []
            reader = threading.Thread(target=lambda: long_tokens.extend((time.monotonic(), ev.token_id)
                                                                        for ev in long_stream))
            reader.start()
            wait_for(in_pieces, 60, "the long prompt's first piece")
            answers: dict[str, tuple[float, list[int]]] = {}

            def answer(name: str, spec: dict) -> None:
                tokens = client.generate(**spec, timeout=60).token_ids
                answers[name] = time.monotonic(), tokens

            others = [threading.Thread(target=answer, args=item)
                      for item in (("short", short), ("medium", medium), ("large", large))]
            for t in others:
                t.start()
            for t in others + [reader]:
                t.join(120)
            assert long_tokens and set(answers) == {"short", "medium", "large"}
            waited = [name for name, (done, _) in answers.items() if done > long_tokens[0][0]]
            assert not waited, f"waited for the long prompt: {waited}"

            def cached_blocks() -> int:
                return c.health(prefill)["prefix_cache_blocks"]

            # 1,329 tokens, of which the short prompt's 96 are cached
            before = cached_blocks()
            cancelled = client.stream(**long | {"prompt": PROMPTS[1] * 190}, timeout=120)
            wait_for(lambda: in_pieces() and cached_blocks() > before, 60,
                     "the cancelled prompt's first pieces in the prefix cache before its last")
            cancelled.close()
            wait_for(lambda: c.health(prefill)["queued_tokens"] == 0, 60, "the cancel")
            assert cached_blocks() > before, "its pieces left the prefix cache"
            # a prompt whose prompt logprobs are asked for is computed whole, in a pass of its own
            with_logprobs = client.generate(PROMPTS[0] * 30, max_new_tokens=1, prompt_logprobs=True, timeout=60)
            logprobs = with_logprobs.details.prompt_logprobs
            assert len(logprobs) == 300 and logprobs[0] is None and None not in logprobs[1:]
        c.wait_idle()
    model = load_cpu(slow_model)
    got = [[t for _, t in long_tokens], answers["short"][1], answers["medium"][1], answers["large"][1]]
    assert got == offline(model, [long, short, medium, large])


def test_a_negative_chunk_is_refused():
    from splitserve.common.service_config import worker_options, worker_parser

    with pytest.raises(ValueError, match="--prefill-chunk-tokens -1: give 0"):
        worker_options(worker_parser("prefill").parse_args(["--prefill-chunk-tokens", "-1"]))


def test_a_worker_whose_work_runs_past_its_watchdog_exits(home, slow_model):
    """Taken for hung, it exits: alive, a worker stuck in a kernel would keep its memory and answer
    its probes from their own thread, and nobody would start it again."""
    from splitserve.common.worker_loop import EXIT_HUNG

    with Cluster(home, model=str(slow_model)) as c:
        c.start_pipeline(2, "--watchdog-timeout", "0.3")
        prefill = next(w["proc"] for w in c.workers.values() if w["role"] == "prefill")
        with Client(c.endpoint) as client:
            with pytest.raises(GenerationError, match="prefill worker"):
                client.generate(SLOW_PROMPT, max_new_tokens=2, timeout=30)
        assert prefill.wait(timeout=30) == EXIT_HUNG


@pytest.mark.parametrize("watchdog", [0.6, 0])
def test_a_link_beats_while_its_worker_works_until_the_watchdog_timeout(watchdog):
    """While the loop runs a unit of work, a thread beats for it every interval; once that work has
    run past the watchdog timeout the beats stop and `on_hung` is called, once (0: no limit)."""
    ctx = zmq.Context()
    router = ProbeRouter(ctx)
    register = P.Register("decode", "slow", P.PROTOCOL_VERSION, "host", [], "cpu", "", ["shm"], 1, "fp", "float32", 0,
                          os.getpid(), "pid:0")
    hung: list[float] = []
    link = GatewayLink(ctx, router.endpoint, register, list, 0.1, 60, watchdog_s=watchdog, on_hung=hung.append)
    heard_at: list[float] = []  # when each heartbeat came, from the work's start
    try:
        router.register()
        link.receive()
        link.tick(1, False)
        seen = len(router.read())
        with link.working():
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:  # the work: the loop sends nothing meanwhile
                new = router.read()[seen:]
                seen += len(new)
                heard_at += [time.monotonic() - t0 for m in new if isinstance(m, P.Heartbeat)]
                time.sleep(0.01)
        assert len([t for t in heard_at if t < 1.0]) >= 3, heard_at
        assert all(m == P.Heartbeat(1, False) for m in router.heard if isinstance(m, P.Heartbeat))
        if watchdog:
            assert not [t for t in heard_at if t > 1.2], heard_at  # silent once past the watchdog
            assert len(hung) == 1 and hung[0] >= watchdog
        else:
            assert len([t for t in heard_at if t > 1.5]) >= 2 and not hung, heard_at
    finally:
        link.close()
        router.sock.close(0)
        ctx.term()


def test_a_drained_worker_leaves_the_router_s_books_as_it_exits(home, tiny_dir):
    """A worker that finishes its drain says goodbye: the router drops it at once, not at its
    heartbeat timeout (here 60 s) as a silent one, which it logged as a warning on every shutdown."""
    with Cluster(home, heartbeat_timeout=60) as c:
        worker_id = c.add_worker("decode", "--num-slots", "2")
        c.wait_registered()
        wait_for(lambda: c.metric("splitserve_workers", role="decode") == 1, 30, "the router to count the worker")
        proc = c.workers[worker_id]["proc"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: c.metric("splitserve_workers", role="decode") == 0, 10, "the router to drop the worker")


class ProbeRouter:
    """The router's end of the worker link, driven by a test: a worker process registers with it."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.decoder = P.decoder(P.WorkerToGateway)
        self.heard: list = []  # every message from the worker, in order
        self.identity = b""

    def read(self) -> list:
        """Every message heard from the worker so far."""
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            self.heard.append(P.decode(self.decoder, frames[1]))
            self.identity = frames[0]
        return self.heard

    def hear(self, want):
        """A condition for wait_for: the first message heard that `want` accepts."""
        return lambda: next((m for m in self.read() if want(m)), None)

    def register(self) -> P.Register:
        register = wait_for(self.hear(lambda m: isinstance(m, P.Register)), 120, "the worker to register")
        self.send(P.Registered(True))
        return register

    def send(self, msg) -> None:
        self.sock.send_multipart([self.identity, P.encode(msg)])


def test_a_busy_worker_beats_every_interval_and_tells_its_drain_at_once():
    """Only heartbeats carry a worker's load and drain, so they go every interval however much else
    the worker sends, and the first beat after a drain begins goes at once (before: a worker whose
    other messages flowed without pause skipped every beat, and the router, never told that it
    drained, routed it prompts until its drain timed out: found in a storm, 325 requests failed)."""
    ctx = zmq.Context()
    router = ProbeRouter(ctx)
    register = P.Register("prefill", "busy", P.PROTOCOL_VERSION, "host", [], "cpu", "", ["shm"], 1, "fp", "float32", 0,
                          os.getpid(), "pid:0")
    link = GatewayLink(ctx, router.endpoint, register, list, 0.2, 60)
    seen = 0

    def beats() -> list[P.Heartbeat]:
        """The heartbeats heard since the last call."""
        nonlocal seen
        new = router.read()[seen:]
        seen += len(new)
        return [m for m in new if isinstance(m, P.Heartbeat)]

    try:
        deadline = time.monotonic() + 1.0
        heard: list[P.Heartbeat] = []
        while time.monotonic() < deadline:  # a message every 10 ms, as a busy worker sends them
            link.send(P.Finished("r", "length"))
            link.tick(3, False)
            heard += beats()
            time.sleep(0.01)
        assert len(heard) >= 3 and all(b == P.Heartbeat(3, False) for b in heard)
        link.send(P.Finished("r", "length"))
        link.tick(3, True)  # the drain begins: told now, not at the next interval
        assert wait_for(beats, 1, "the drain's heartbeat") == [P.Heartbeat(3, True)]
    finally:
        link.close()
        router.sock.close(0)
        ctx.term()


def test_a_decode_worker_ends_at_once_a_cancelled_request_it_is_not_running(home):
    """The router frees a decode reservation when the worker says the request ended. A Cancel of
    a request the worker is not running (its KV on the way, ended already, or never to come) is
    ended at once; its KV, should it come, is refused, with no second end. Before, such a Cancel
    had no answer, and the router's reservation stayed held for its 2-minute grace."""
    ctx = zmq.Context()
    router = ProbeRouter(ctx)
    worker = spawn(home, "decode", "--model", "tiny-random", "--gateway", router.endpoint, "--worker-id", "d",
                   "--num-slots", "2", "--heartbeat-timeout", "60")
    kv = ctx.socket(zmq.DEALER)
    try:
        register = router.register()
        router.send(P.Cancel("ghost"))
        wait_for(router.hear(lambda m: m == P.Finished("ghost", "cancelled")), 30, "the cancel's end")
        kv.connect(register.kv_endpoint)
        request = GenerateRequest("ghost", (1, 2, 3), 4, reply_to="tcp://127.0.0.1:1")
        kv.send(P.encode(P.KvReady(request, 5, "x", P.KvLocation(0, 3, "staging"), "tcp", "p")))
        assert wait_for(lambda: kv.poll(0) and P.decode(P.decoder(P.KvRelease), kv.recv()), 30,
                        "the KV's release") == P.KvRelease("ghost", 0)
        router.send(P.Cancel("marker"))  # its end comes after any for ghost
        wait_for(router.hear(lambda m: m == P.Finished("marker", "cancelled")), 30, "the marker's end")
        assert [m for m in router.heard if isinstance(m, P.Finished)] == [P.Finished("ghost", "cancelled"),
                                                                          P.Finished("marker", "cancelled")]
    finally:
        worker.kill()
        worker.wait()
        kv.close(0)
        router.sock.close(0)
        ctx.term()


def test_a_prefill_worker_tells_the_router_prefilled_once_the_decode_worker_has_the_kv(home, lm):
    """Until the router hears Prefilled, a prefill worker's death loses the request, which then
    resumes exactly. So Prefilled goes once the decode worker has released the KV, not when the
    first token goes: a prefill worker killed in between (its KvReady never sent, or unread)
    left the request waiting for KV that had died with it, and its decode slot held, for good."""
    ctx = zmq.Context()
    router = ProbeRouter(ctx)
    decode = ctx.socket(zmq.ROUTER)  # the decode worker's KV endpoint
    decode_endpoint = f"tcp://127.0.0.1:{decode.bind_to_random_port('tcp://127.0.0.1')}"
    front = ctx.socket(zmq.PULL)  # the frontend's token endpoint
    front_endpoint = f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}"
    worker = spawn(home, "prefill", "--model", "tiny-random", "--gateway", router.endpoint, "--worker-id", "p",
                   "--kv-transport", "tcp", "--heartbeat-interval", "0.1", "--heartbeat-timeout", "60")
    kinds = P.decoder(P.KvToDecode)
    try:
        router.register()
        request = GenerateRequest("r", tuple(lm.tokenizer.encode("def f(x):")), 4, reply_to=front_endpoint)
        router.send(P.Prefill(request, "d", decode_endpoint, "tcp"))
        first = wait_for(lambda: front.poll(0) and P.decode(P.decoder(P.WorkerToFrontend), front.recv()), 60,
                         "the first token")
        assert first.id == "r" and first.finish_reason is None

        def ready():
            while decode.poll(0):
                peer, frame, *_ = decode.recv_multipart()
                msg = P.decode(kinds, frame)
                if isinstance(msg, P.KvReady):
                    return peer, msg
            return None

        peer, kv_ready = wait_for(ready, 30, "the KV")
        beats = lambda: sum(isinstance(m, P.Heartbeat) for m in router.read())  # noqa: E731
        after = beats() + 3  # the last of them sent a few intervals after the KV went
        wait_for(lambda: beats() >= after, 30, "heartbeats")
        assert not any(isinstance(m, P.Prefilled) for m in router.heard)
        decode.send_multipart([peer, P.encode(P.KvRelease("r", kv_ready.location.offset))])
        wait_for(router.hear(lambda m: m == P.Prefilled("r")), 30, "Prefilled")
    finally:
        worker.kill()
        worker.wait()
        for name in [f for f in os.listdir("/dev/shm") if f"-{worker.pid}-" in f]:  # its staging, killed
            os.unlink(f"/dev/shm/{name}")
        for sock in (router.sock, decode, front):
            sock.close(0)
        ctx.term()


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_health_while_a_worker_starts_says_so(role):
    # the probe's HTTP server answers from the worker's __init__, before its own state exists
    from splitserve.decode_worker.worker import DecodeWorker
    from splitserve.prefill_worker.worker import PrefillWorker

    worker = object.__new__({"prefill": PrefillWorker, "decode": DecodeWorker}[role])
    worker.link, worker.draining = None, False
    assert worker.health() == {"role": role, "registered": False, "draining": False, "starting": True}
