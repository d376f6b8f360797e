"""The gateway core's bookkeeping, driven directly with worker messages: shared prefills for
OpenAI's `n`, a waiting group losing its first member, a request resumed after its worker died."""

from __future__ import annotations

import pytest

from splitserve.common import protocol as P
from splitserve.common.params import Limits
from splitserve.common.tokenizer import Tokenizer
from splitserve.gateway.core import GatewayCore
from splitserve.gateway.workers import Expectations, NoTransport, WorkerRegistry, transport_between


def registration(role: str, wid: str, capacity: int = 4, host: str = "h", gpus: tuple[str, ...] = (),
                 transports: tuple[str, ...] = ("shm", "tcp"), pid_namespace: str = "ns") -> P.Register:
    return P.Register(role=role, worker_id=wid, protocol=P.PROTOCOL_VERSION, host_id=host, gpu_uuids=list(gpus),
                      device="cuda" if gpus else "cpu", kv_endpoint=f"tcp://127.0.0.1:1/{wid}",
                      kv_transports=list(transports), capacity=capacity, model_fingerprint="fp", dtype="float32",
                      slot_len=64, pid=1, pid_namespace=pid_namespace)


def register(registry: WorkerRegistry, role: str, wid: str, capacity: int, **kw) -> None:
    assert registry.register(wid.encode(), registration(role, wid, capacity, **kw)) == ""


@pytest.fixture
def core(tiny_dir):
    registry = WorkerRegistry(Expectations("fp", 64), heartbeat_timeout=60)
    sent: list = []
    core = GatewayCore(Tokenizer.from_dir(tiny_dir), Limits.derive(2048, 64), registry,
                       lambda worker, msg: sent.append((worker.id, msg)), max_concurrent=16)
    core.sent = sent
    return core


def generate(seed: int, prompt: str = "def f(x):") -> P.Generate:
    return P.Generate(f"c{seed}", prompt, params=P.GenerateParams(max_new_tokens=8, do_sample=True, seed=seed))


def submit_group(core, n: int, out: list) -> list[str]:
    gids = []
    for i in range(n):
        gids.append(core.submit(f"c{i}", generate(i), out.append, gids[0] if i else None, dispatch=False))
    core.dispatch()
    return gids


def test_choices_with_one_prompt_share_one_prefill(core):
    register(core.registry, "prefill", "p", 2048)
    register(core.registry, "decode", "d", 4)
    gids = submit_group(core, 3, [])
    (worker, msg), = core.sent
    assert worker == "p" and msg.request.id == gids[0] and [f.id for f in msg.forks] == gids[1:]
    assert [f.sampling.seed for f in msg.forks] == [1, 2]
    assert core.registry.workers["d"].assigned == set(gids)
    # the shared prompt is queued once
    assert core.registry.workers["p"].queued_tokens == len(msg.request.prompt_ids)


def test_a_group_too_big_for_any_decode_worker_runs_as_separate_requests(core):
    register(core.registry, "prefill", "p", 2048)
    register(core.registry, "decode", "d", 2)
    submit_group(core, 3, [])
    assert [len(m.forks) for _, m in core.sent] == [1]  # two fit in one pool; the third waits alone
    assert len(core.waiting) == 1


def test_the_first_of_a_waiting_group_leaving_hands_the_group_on(core):
    register(core.registry, "prefill", "p", 2048)
    register(core.registry, "decode", "d", 4)
    core.registry.workers["d"].assigned.update({"x1", "x2", "x3", "x4"})  # full: the group waits
    gids = submit_group(core, 3, [])
    core.cancel(gids[0], "cancelled")
    assert list(core.waiting) == [gids[1]]
    core.registry.workers["d"].assigned.clear()
    core.dispatch()
    (_, msg), = core.sent
    assert msg.request.id == gids[1] and [f.id for f in msg.forks] == [gids[2]]


def test_a_request_whose_decode_worker_died_resumes_with_what_the_client_has(core):
    register(core.registry, "prefill", "p", 2048)
    register(core.registry, "decode", "d1", 4)
    out: list = []
    gid = core.submit("c", generate(9), out.append)
    prompt = core.sent[0][1].request.prompt_ids
    core.on_worker(core.registry.workers["p"], P.FirstToken(gid, P.Token(0, 11, "a")))
    core.on_worker(core.registry.workers["d1"], P.StepTokens([P.StepEntry(gid, P.Token(1, 12, "b")),
                                                              P.StepEntry(gid, P.Token(3, 14, "d"))]))
    register(core.registry, "decode", "d2", 4)
    dead = core.registry.workers.pop("d1")
    core.worker_left(dead)
    core.dispatch()
    resumed = core.sent[-1][1]
    assert resumed.decode_worker == "d2" and resumed.request.id != gid
    # token 3 arrived out of order and never reached the client: it is generated again
    assert resumed.request.prompt_ids == (*prompt, 11, 12) and resumed.request.resumed == 2
    assert resumed.request.max_new_tokens == 6 and resumed.request.sampling.seed == 9
    core.cancel(gid, "cancelled")  # the client's id still reaches the resumed attempt
    assert core.sent[-2:] == [("p", P.Cancel(resumed.request.id)), ("d2", P.Cancel(resumed.request.id))]


# ---- how KV moves between two workers ---------------------------------------------------------

GPU_A, GPU_B = "uuid-a", "uuid-b"
CUDA, CPU = ("cuda_ipc", "tcp"), ("shm", "tcp")


@pytest.mark.parametrize("prefill, decode, want", [
    (dict(gpus=(GPU_A,), transports=CUDA), dict(gpus=(GPU_A, GPU_B), transports=CUDA), "cuda_ipc"),
    (dict(gpus=(GPU_A,), transports=CUDA), dict(gpus=(GPU_B,), transports=CUDA), "tcp"),  # GPU not visible
    (dict(gpus=(GPU_A,), transports=CUDA), dict(gpus=(GPU_A,), transports=CUDA, pid_namespace="other"), "tcp"),
    (dict(gpus=(GPU_A,), transports=CUDA, host="h2"), dict(gpus=(GPU_A,), transports=CUDA), "tcp"),
    (dict(), dict(), "shm"),
    (dict(), dict(pid_namespace="other"), "shm"),  # CPU workers: the PID namespace does not matter
    (dict(host="h2"), dict(), "tcp"),
])
def test_auto_takes_the_fastest_transport_that_works(prefill, decode, want):
    assert transport_between("auto", registration("prefill", "p", **prefill), registration("decode", "d", **decode)) == want


@pytest.mark.parametrize("flag, prefill, decode, reason", [
    ("shm", dict(host="h2"), dict(), "different hosts"),
    ("shm", dict(gpus=(GPU_A,), transports=CUDA), dict(), "the prefill worker offers cuda_ipc, tcp"),
    ("cuda_ipc", dict(gpus=(GPU_A,), transports=CUDA, host="h2"), dict(gpus=(GPU_A,), transports=CUDA),
     "different hosts"),
    ("cuda_ipc", dict(gpus=(GPU_A,), transports=CUDA), dict(gpus=(GPU_B,), transports=CUDA), "cannot see"),
    ("cuda_ipc", dict(gpus=(GPU_A,), transports=CUDA), dict(gpus=(GPU_A,), transports=CUDA, pid_namespace="x"),
     "PID namespace"),
    ("tcp", dict(), dict(transports=("shm",)), "the decode worker offers shm"),
])
def test_an_explicit_transport_that_cannot_work_is_refused_naming_the_pair(flag, prefill, decode, reason):
    with pytest.raises(NoTransport, match=f"prefill worker p to decode worker d .*{reason}"):
        transport_between(flag, registration("prefill", "p", **prefill), registration("decode", "d", **decode))


def test_an_explicit_transport_that_works_is_honoured():
    assert transport_between("tcp", registration("prefill", "p"), registration("decode", "d")) == "tcp"


def test_requests_go_only_to_pairs_that_can_hand_over_and_fail_clearly_when_none_can(core):
    core.registry.transport_flag = "shm"
    register(core.registry, "prefill", "p-far", 2048, host="h2")
    register(core.registry, "decode", "d", 4)
    out: list = []
    core.submit("c1", generate(1), out.append)
    assert not core.sent and not core.streams and not core.waiting  # no silent fallback to tcp
    (error,) = out
    assert error.error_type == "unavailable" and "prefill worker p-far to decode worker d" in error.message
    register(core.registry, "prefill", "p-near", 2048)  # busier, but on the decode worker's host
    core.registry.workers["p-near"].queued_tokens = 10_000
    core.submit("c2", generate(2), out.append)
    ((worker, msg),) = core.sent
    assert worker == "p-near" and msg.transport == "shm"
