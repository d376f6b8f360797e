"""The router's and a frontend's books, wired to each other in one process and driven directly
with worker messages: shared prefills for OpenAI's `n`, a waiting group losing its first member,
a request resumed after its worker died, a frontend's death, a router's restart."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from functools import partial

import pytest

from splitserve.common import protocol as P
from splitserve.common.model_config import Rope, load_model_config
from splitserve.common.params import Limits
from splitserve.common.prefix_blocks import block_hashes, block_namespace
from splitserve.common.tokenizer import Tokenizer
from splitserve.gateway import off_loop
from splitserve.gateway.frontend_core import FrontendCore
from splitserve.gateway.router_core import RouterCore
from splitserve.gateway.workers import Expectations, NoTransport, WorkerRegistry, transport_between


def registration(role: str, wid: str, capacity: int = 4, host: str = "h", gpus: tuple[str, ...] = (),
                 transports: tuple[str, ...] = ("shm", "tcp"), pid_namespace: str = "ns",
                 prefix_block_tokens: int = 0) -> P.Register:
    return P.Register(role=role, worker_id=wid, protocol=P.PROTOCOL_VERSION, host_id=host, gpu_uuids=list(gpus),
                      device="cuda" if gpus else "cpu", kv_endpoint=f"tcp://127.0.0.1:1/{wid}",
                      kv_transports=list(transports), capacity=capacity, model_fingerprint="fp", dtype="float32",
                      slot_len=64, pid=1, pid_namespace=pid_namespace, prefix_blocks=64 if prefix_block_tokens else 0,
                      prefix_block_tokens=prefix_block_tokens)


class Books:
    """A router and one frontend whose messages to each other are delivered at once; what goes to
    workers is collected in `sent` as (worker id, message)."""

    def __init__(self, tokenizer: Tokenizer, router: RouterCore | None = None, restart_wait: float = 0.0,
                 namespace=lambda request: b""):
        self.sent: list = []
        self.registry = WorkerRegistry(Expectations("fp", 64), heartbeat_timeout=60) if router is None \
            else router.registry
        self.router = router or RouterCore(self.registry, lambda w, msg: self.sent.append((w.id, msg)),
                                           self._to_frontend, 16, 60.0, "fp", restart_wait)
        self.frontend = FrontendCore(tokenizer, Limits.derive(2048, 64), self._to_router, "tcp://front:1", namespace)
        self.join()

    def join(self, live: tuple[str, ...] = ()) -> None:
        hello = P.Hello("f1", P.PROTOCOL_VERSION, "fp", "tcp://front:1", "tcp://front:2", list(live))
        assert self.router.hello(b"f1", hello) == ""
        self.sync()

    def sync(self) -> None:
        if "f1" in self.router.frontends:
            self.frontend.on_router(self.router.fleet(self.router.frontends["f1"]))
        check_open_counts(self.router)

    def _to_frontend(self, front, msg) -> None:
        self.frontend.on_router(msg)

    def _to_router(self, msg) -> None:
        self.router.on_frontend(self.router.frontends["f1"], msg)
        check_open_counts(self.router)

    def register(self, role: str, wid: str, capacity: int, holding: tuple[P.Held, ...] = (), **kw) -> None:
        assert self.registry.register(wid.encode(), registration(role, wid, capacity, **kw)) == ""
        self.router.registered(self.registry.workers[wid], list(holding))
        self.sync()

    def worker(self, wid: str, msg) -> None:
        """A worker's message: tokens to the frontend, the rest to the router."""
        if isinstance(msg, (P.FirstToken, P.StepTokens)):
            self.frontend.on_tokens(msg)
        else:
            self.router.on_worker(self.registry.workers[wid], msg)
        check_open_counts(self.router)


def check_open_counts(router: RouterCore) -> None:
    """The router keeps its counts of open attempts as they change; they must equal a count over its books."""
    by_frontend: dict[str, int] = {}
    for a in router.attempts.values():
        if not a.closed_at and a.frontend is not None:
            by_frontend[a.frontend] = by_frontend.get(a.frontend, 0) + 1
    assert router.open == by_frontend and router.live() == sum(by_frontend.values())


@pytest.fixture
def books(tiny_dir):
    return Books(Tokenizer.from_dir(tiny_dir))


def generate(seed: int, prompt: str = "def f(x):") -> P.Generate:
    return P.Generate(f"c{seed}", prompt, params=P.GenerateParams(max_new_tokens=8, do_sample=True, seed=seed))


def submit_group(books: Books, n: int, out: list) -> list[str]:
    gids = []
    for i in range(n):
        gids.append(books.frontend.submit(f"c{i}", generate(i), out.append, gids[0] if i else None, dispatch=False))
    books.frontend.dispatch()
    return gids


def test_choices_with_one_prompt_share_one_prefill(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    gids = submit_group(books, 3, [])
    (worker, msg), = books.sent
    assert worker == "p" and msg.request.id == gids[0] and [f.id for f in msg.forks] == gids[1:]
    assert [f.sampling.seed for f in msg.forks] == [1, 2]
    assert books.registry.workers["d"].assigned == set(gids)
    # the shared prompt is queued once
    assert books.registry.workers["p"].queued_tokens == len(msg.request.prompt_ids)


def test_a_long_longrope_prompt_keeps_its_blocks_namespace_at_the_router(tiny_dir):
    """Past LongRoPE's pretraining length a prompt turns all with the long factors, so the prefill
    worker keeps its blocks apart from a short prompt's with the same ids (block_namespace): the
    frontend hashes them so, and the router too for a block size the frontend did not know, so that
    a short prompt's blocks never draw a long one to their worker."""
    cfg = replace(load_model_config(tiny_dir), rope=Rope("longrope", 1e4, original_max_positions=32))
    books = Books(Tokenizer.from_dir(tiny_dir), namespace=partial(block_namespace, cfg))
    books.register("prefill", "p", 4096, prefix_block_tokens=16)
    books.register("decode", "d", 4)
    line = "def f(x):\n    return x\n"
    for text, namespace in ((line * 2, b""), (line * 5, b"long-rope")):
        gid = books.frontend.submit("c", P.Generate("c", text, params=P.GenerateParams(max_new_tokens=4)), [].append)
        attempt = books.router.attempts[gid]
        ids = attempt.request.prompt_ids
        assert (len(ids) > 32) == (namespace != b"") and len(ids) >= 16
        assert block_namespace(cfg, attempt.request) == namespace  # the prefill worker's
        assert attempt.hashes == {16: block_hashes(ids, 16, namespace)}  # from the frontend
        assert attempt.block_hashes(8) == block_hashes(ids, 8, namespace)  # the router's own
        assert set(attempt.hashes[16]) <= set(books.registry.workers["p"].prefixes)
    # a resumed request keeps its first attempt's: its prompt ends with the answer's tokens
    grown = replace(attempt.request, prompt_ids=ids[:30] + ids[:10], resumed=10)
    assert block_namespace(cfg, grown) == b""


def test_a_long_prompt_text_is_admitted_once_the_tokenizer_thread_is_done(books):
    """Past off_loop.LONG_TEXT a prompt's text is tokenized off the event loop: the request is running
    from its submit, admitted when its ids are ready, ended there by a cancel meanwhile, and refused
    through its sink when too long."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    front = books.frontend
    long = "#" * (off_loop.LONG_TEXT + 1000)  # few tokens, many characters
    out: list = []

    async def run() -> None:
        kept = front.submit("c1", generate(1, long), out.append)
        cancelled = front.submit("c2", generate(2, long), out.append)
        too_long = front.submit("c3", generate(3, "a" * (off_loop.LONG_TEXT + 1000)), out.append)
        assert all(front.running(g) for g in (kept, cancelled, too_long)) and front.live() == 3
        assert not books.sent  # nothing admitted before its ids are known
        front.cancel(cancelled, reason="cancelled")
        assert out == [P.TokenBatch("c2", [], "cancelled")] and not front.running(cancelled)
        deadline = time.monotonic() + 30
        while front.tokenizing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not front.tokenizing
        (worker, msg), = books.sent
        assert worker == "p" and msg.request.id == kept and list(msg.request.prompt_ids) == front.tokenizer.encode(long)
        assert front.running(kept) and not front.running(too_long) and front.live() == 1
        (error,) = out[1:]
        assert error.id == "c3" and error.error_type == "validation" and "max_input_tokens" in error.message

    asyncio.run(run())


def test_a_group_too_big_for_any_decode_worker_runs_as_separate_requests(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 2)
    submit_group(books, 3, [])
    assert [len(m.forks) for _, m in books.sent] == [1]  # two fit in one pool; the third waits alone
    assert len(books.router.waiting) == 1


def test_the_first_of_a_waiting_group_leaving_hands_the_group_on(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    books.registry.workers["d"].assigned.update({"x1", "x2", "x3", "x4"})  # full: the group waits
    gids = submit_group(books, 3, [])
    books.frontend.cancel(gids[0], "cancelled")
    assert list(books.router.waiting) == [gids[1]]
    books.registry.workers["d"].assigned.clear()
    books.router.dispatch()
    (_, msg), = books.sent
    assert msg.request.id == gids[1] and [f.id for f in msg.forks] == [gids[2]]


def test_in_a_drain_what_waits_for_a_slot_ends_once_no_worker_can_take_it(books):
    """While a worker of each role takes work, a drain lets waiting requests wait (a worker that
    registers takes them); once every worker of a role drains, they end at the next tick, rather
    than holding their frontend's drain until its timeout."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    books.registry.workers["d"].assigned.update({"x1", "x2", "x3", "x4"})  # full: the group waits
    out: list = []
    gids = submit_group(books, 2, out)
    books.router.draining = True
    books.router.tick()
    assert list(books.router.waiting) == [gids[0]] and out == []
    books.registry.seen(b"d", draining=True)
    books.router.tick()
    assert not books.router.waiting and not books.frontend.streams
    assert [(e.error_type, e.message) for e in out] == [("unavailable", "the server shut down before the request "
                                                         "could start")] * 2


def test_a_request_whose_decode_worker_died_resumes_with_what_the_client_has(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d1", 4)
    out: list = []
    gid = books.frontend.submit("c", generate(9), out.append)
    prompt = books.sent[0][1].request.prompt_ids
    books.worker("p", P.FirstToken(gid, P.Token(0, 11, "a")))
    books.worker("d1", P.StepTokens([P.StepEntry(gid, P.Token(1, 12, "b")), P.StepEntry(gid, P.Token(3, 14, "d"))]))
    books.register("decode", "d2", 4)
    dead = books.registry.workers.pop("d1")
    books.router.worker_left(dead)
    books.router.dispatch()
    resumed = books.sent[-1][1]
    assert resumed.decode_worker == "d2" and resumed.request.id != gid
    # token 3 arrived out of order and never reached the client: it is generated again
    assert resumed.request.prompt_ids == (*prompt, 11, 12) and resumed.request.resumed == 2
    assert resumed.request.max_new_tokens == 6 and resumed.request.sampling.seed == 9
    books.frontend.cancel(gid, "cancelled")  # the client's id still reaches the resumed attempt
    assert books.sent[-2:] == [("p", P.Cancel(resumed.request.id)), ("d2", P.Cancel(resumed.request.id))]


def test_a_request_a_client_resumes_goes_on_after_the_tokens_it_has(books):
    """A client whose frontend died sends the request again with the tokens it has (resume): it
    runs as a request resumed after a worker death does, its tokens going on from there; a resume
    that leaves nothing to generate, or names a token the vocabulary lacks, is refused."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d1", 4)
    out: list = []
    msg = generate(9)
    msg.resume = [11, 12]
    gid = books.frontend.submit("c", msg, out.append)
    prefill = books.sent[-1][1]
    assert prefill.request.prompt_ids[-2:] == (11, 12) and prefill.request.resumed == 2
    assert prefill.request.max_new_tokens == 6 and prefill.request.sampling.seed == 9
    books.worker("p", P.FirstToken(gid, P.Token(2, 13, "c")))
    assert out == [P.TokenBatch("c", [P.Token(2, 13, "c")], None, 0, 9)]  # (the prompt's count came before)
    # its worker dies: resumed again, with every token its client has
    books.worker("d1", P.StepTokens([P.StepEntry(gid, P.Token(3, 14, "d"))]))
    books.register("decode", "d2", 4)
    books.router.worker_left(books.registry.workers.pop("d1"))
    books.router.dispatch()
    again = books.sent[-1][1].request
    assert again.prompt_ids == (*prefill.request.prompt_ids, 13, 14) and again.resumed == 4
    assert again.max_new_tokens == 4
    for resume, why in (([1] * 8, "nothing would be left"), ([10**6], "resume must be in")):
        msg = generate(10)
        msg.resume = resume
        assert books.frontend.submit("bad", msg, out.append) is None
        assert out[-1].error_type == "validation" and why in out[-1].message


def test_a_request_a_client_resumes_waits_for_the_workers_of_a_router_just_started(books):
    """A restarted gateway's workers register again within moments: a request that a client resumes
    (it was streaming when the gateway died) is admitted meanwhile and goes once they have, while a
    new one is refused (503, as of any server that is not ready). A router long up refuses both."""
    resumed, new = generate(9), generate(10)
    resumed.resume = [11, 12]
    out: list = []
    gid = books.frontend.submit("c", resumed, out.append)
    assert books.frontend.submit("new", new, out.append) is None and books.sent == []
    assert [(e.id, e.message) for e in out] == [("new", "no prefill worker is available")]
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    assert [(w, m.request.id, m.request.resumed) for w, m in books.sent] == [("p", gid, 2)]
    books.router.started -= books.router.settle  # long up
    books.sync()
    books.router.worker_left(books.registry.workers.pop("p"))
    books.router.unstaffed_since -= books.router.settle  # and its prefill worker long gone
    books.sync()
    assert books.frontend.submit("c2", resumed, out.append) is None
    assert [(e.id, e.message) for e in out if e.id == "c2"] == [("c2", "no prefill worker is available")]


def decoding(books: Books) -> tuple[str, list]:
    """A prefill worker p, a decode worker d of 4 slots, and a request prefilled and handed to d:
    -> its id, and the list its replies go to."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    out: list = []
    gid = books.frontend.submit("c", generate(3), out.append)
    books.worker("p", P.FirstToken(gid, P.Token(0, 11, "a")))
    books.worker("p", P.Prefilled(gid))
    return gid, out


def test_a_request_whose_only_worker_of_a_role_died_waits_for_one_started_again(books):
    """serve starts a dead worker again within seconds: a request it was running resumes on the
    new one, as it would on another (before, with no other worker of its role, it ended at once
    with "no worker is left to resume it"). Past the settle time it ends so (see the test above)."""
    books.router.started -= books.router.settle  # long up
    gid, out = decoding(books)
    books.router.worker_left(books.registry.workers.pop("d"))
    books.sync()
    books.router.tick()
    assert [e.error_type for e in out if isinstance(e, P.Error)] == [] and len(books.router.waiting) == 1
    books.register("decode", "d-r1", 4)
    resumed = books.sent[-1][1]
    assert books.sent[-1][0] == "p" and resumed.decode_worker == "d-r1" and resumed.request.resumed == 1


def test_what_waits_ends_once_a_role_has_had_no_worker_for_the_settle_time(books):
    """A request waiting for a decode slot, or resumed after its worker died, waits for a worker
    started again within the settle time; past it, it ends (503, or 424 for one that was running),
    rather than waiting for good (before: until its client's timeout, or for ever)."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 1)
    out: list = []
    books.frontend.submit("a", generate(3), out.append)
    waiting = books.frontend.submit("b", generate(4), out.append)  # the one slot is taken
    assert list(books.router.waiting) == [waiting]
    books.router.worker_left(books.registry.workers.pop("d"))
    books.sync()
    books.router.tick()
    # the running one resumed (a new attempt), both wait: a worker may come back yet
    assert len(books.router.waiting) == 2 and waiting in books.router.waiting and out == []
    books.router.unstaffed_since -= books.router.settle
    books.router.tick()
    assert not books.router.waiting and not books.frontend.streams
    assert sorted((e.id, e.error_type, e.message) for e in out) == [
        ("a", "generation", "decode worker d stopped responding; no worker is left to resume it"),
        ("b", "unavailable", "no decode worker is available")]


def test_a_longer_worker_restart_timeout_keeps_resumed_work_waiting_for_a_slow_start(tiny_dir):
    """--worker-restart-timeout: a worker that takes long to load (a large model) after serve or
    Kubernetes started it again still takes the request its predecessor was running, past the
    settle time; past the timeout the request ends, as it does past the settle time without it."""
    for comes_back in (True, False):
        books = Books(Tokenizer.from_dir(tiny_dir), restart_wait=600.0)
        books.router.started -= books.router.settle  # long up
        _, out = decoding(books)
        books.router.worker_left(books.registry.workers.pop("d"))
        books.router.unstaffed_since -= 2 * books.router.settle  # the settle time is long past
        books.router.tick()
        assert [e for e in out if isinstance(e, P.Error)] == [] and len(books.router.waiting) == 1
        if comes_back:
            books.register("decode", "d-r1", 4)
            assert books.sent[-1][0] == "p" and books.sent[-1][1].decode_worker == "d-r1"
        else:
            books.router.unstaffed_since -= books.router.restart_wait
            books.router.tick()
            assert [e.error_type for e in out if isinstance(e, P.Error)] == ["generation"]


def test_the_router_frees_a_slot_at_the_workers_end_and_never_sees_a_token(books):
    gid, out = decoding(books)
    assert books.registry.workers["p"].queued_tokens == 0 and books.registry.workers["d"].assigned == {gid}
    books.worker("d", P.StepTokens([P.StepEntry(gid, P.Token(1, 12, "b"), "length")]))
    assert out[-1].finish_reason == "length" and not books.frontend.streams
    assert books.registry.workers["d"].assigned == {gid}  # until the worker says its slot is free
    assert books.router.live() == 0  # but it no longer counts against the concurrency limit
    books.worker("d", P.Finished(gid, "length"))
    assert not books.registry.workers["d"].assigned and not books.router.attempts


def test_a_deadline_at_the_worker_reaches_the_client_as_a_timeout(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    out: list = []
    gid = books.frontend.submit("c", generate(3), out.append)
    books.worker("p", P.FirstToken(gid, P.Token(0, 11, "a")))
    books.worker("d", P.Finished(gid, "timeout"))
    assert out[-1].error_type == "timeout" and not books.frontend.streams and not books.router.attempts


def test_a_dead_frontends_requests_are_cancelled_at_the_workers(books):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    gids = [books.frontend.submit(f"c{i}", generate(i), [].append) for i in range(2)]
    books.worker("p", P.Prefilled(gids[0]))
    books.sent.clear()
    books.router.frontend_left(books.router.frontends["f1"])
    assert sorted((w, m.id) for w, m in books.sent) == sorted([("p", gids[0]), ("d", gids[0]),
                                                               ("p", gids[1]), ("d", gids[1])])
    for gid in gids:  # the workers' ends free the reservations
        books.worker("d", P.Finished(gid, "cancelled"))
    assert not books.registry.workers["d"].assigned and not books.router.attempts


def test_a_restarted_router_adopts_what_workers_hold_and_frontends_stream(books, tiny_dir):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    out: list = []
    streaming = books.frontend.submit("c1", generate(1), out.append)
    queued = books.frontend.submit("c2", generate(2), out.append)
    books.worker("p", P.FirstToken(streaming, P.Token(0, 11, "a")))
    # a new router: empty books; the decode worker holds one request, the prefill worker the other
    fresh = restarted(books)
    fresh.register("decode", "d", 4, holding=(P.Held(streaming, "d"),))
    fresh.register("prefill", "p", 2048, holding=(P.Held(queued, "d", 5),))
    fresh.join(live=tuple(books.frontend.streams))
    assert fresh.registry.workers["d"].assigned == {streaming, queued}
    assert fresh.registry.workers["p"].queued_tokens == 5
    assert {a.frontend for a in fresh.router.attempts.values()} == {"f1"}
    # its tokens keep flowing to the frontend, and its end frees the adopted slot
    fresh.worker("d", P.StepTokens([P.StepEntry(streaming, P.Token(1, 12, "b"), "length")]))
    fresh.worker("d", P.Finished(streaming, "length"))
    assert out[-1].finish_reason == "length" and fresh.registry.workers["d"].assigned == {queued}
    # a cancel reaches the workers that hold the adopted request
    books.frontend.cancel(queued, "cancelled")
    assert sorted(w for w, m in fresh.sent if isinstance(m, P.Cancel)) == ["d", "p"]


def restarted(books: Books) -> Books:
    """A new router, its books empty, for the frontend of `books`."""
    fresh = Books.__new__(Books)
    fresh.sent = []
    fresh.registry = WorkerRegistry(Expectations("fp", 64), heartbeat_timeout=60)
    fresh.router = RouterCore(fresh.registry, lambda w, msg: fresh.sent.append((w.id, msg)), fresh._to_frontend, 16,
                              60.0, "fp")
    fresh.frontend = books.frontend
    books.frontend.send_router = fresh._to_router
    return fresh


def test_a_restarted_router_resumes_what_a_prefill_worker_held_when_that_worker_dies(books):
    """A prefill worker lists the prompts whose KV waits for its decode worker's release: until
    that release the prefill worker's death loses the request (its KV may never have left), and it
    resumes elsewhere."""
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4)
    out: list = []
    gid = books.frontend.submit("c", generate(1), out.append)
    books.worker("p", P.FirstToken(gid, P.Token(0, 11, "a")))
    fresh = restarted(books)
    fresh.register("decode", "d", 4)
    fresh.register("prefill", "p", 2048, holding=(P.Held(gid, "d"),))
    fresh.register("prefill", "p2", 2048)
    fresh.join(live=tuple(books.frontend.streams))
    fresh.router.worker_left(fresh.registry.workers.pop("p"))
    resumed = fresh.sent[-1]
    assert fresh.sent[-2:] == [("d", P.Cancel(gid)), resumed] and resumed[0] == "p2"
    assert resumed[1].request.id == f"{gid}.2" and resumed[1].request.resumed == 1


def test_adopted_work_no_frontend_claims_is_cancelled_and_claims_no_worker_holds_are_lost(books, monkeypatch):
    books.register("prefill", "p", 2048)
    books.register("decode", "d", 4, holding=(P.Held("orphan", "d"),))
    out: list = []
    gid = books.frontend.submit("c", generate(1), out.append)
    books.frontend.streams[gid].admitted = True
    books.router._remove(gid)  # as if the router had restarted before any worker took it
    books.registry.workers["d"].assigned.discard(gid)
    books.router.waiting.clear()
    books.join(live=(gid,))
    books.sent.clear()
    import time as _time
    later = _time.monotonic() + 1000
    monkeypatch.setattr("splitserve.gateway.router_core.time.monotonic", lambda: later)
    for peer in (books.router.frontends["f1"], *books.registry.workers.values()):
        peer.last_seen = later
    books.router.tick()
    check_open_counts(books.router)
    assert ("d", P.Cancel("orphan")) in books.sent
    # the claimed request was resumed as a new attempt and dispatched
    resumed = [m for _, m in books.sent if isinstance(m, P.Prefill)]
    assert [m.request.id for m in resumed] == [f"{gid}.2"]


def test_what_a_worker_taken_for_dead_still_holds_is_cancelled_at_once_when_it_comes_back(books):
    """A prefill worker frozen past its heartbeat timeout comes back holding the KV of a prompt
    whose attempt the router freed and resumed elsewhere, and whose decode worker has ended it
    already (its Cancel came first). Nobody streams it: the router, settled long ago, cancels it
    when the worker registers, and the decode worker's end frees the reservation at once (found in
    a storm: adopted as if the router had restarted, it held a decode slot for 2 minutes)."""
    books.router.started -= books.router.settle  # a router up for long
    for wid in ("p1", "p2"):
        books.register("prefill", wid, 2048)
    books.register("decode", "d", 4)
    gid = books.frontend.submit("c", generate(1), [].append)
    assert books.sent[-1][0] == "p1"
    books.router.worker_left(books.registry.workers.pop("p1"))  # silent: its prompt resumes on p2
    resumed = books.sent[-1][1].request.id
    assert books.sent[-2:] == [("d", P.Cancel(gid)), ("p2", books.sent[-1][1])] and resumed == f"{gid}.2"
    books.worker("d", P.Finished(gid, "cancelled"))  # the decode worker's end: heard before p1 is back
    books.sent.clear()
    books.register("prefill", "p1", 2048, holding=(P.Held(gid, "d"),))  # its KV's release not read yet
    assert books.sent == [("p1", P.Cancel(gid)), ("d", P.Cancel(gid))]
    assert books.registry.workers["d"].assigned == {gid, resumed}
    books.worker("d", P.Finished(gid, "cancelled"))
    assert books.registry.workers["d"].assigned == {resumed} and list(books.router.attempts) == [resumed]
    assert books.router.live() == 1 and books.frontend.streams[resumed].gid == gid


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


def test_requests_go_only_to_pairs_that_can_hand_over_and_fail_clearly_when_none_can(books):
    books.registry.transport_flag = "shm"
    books.register("prefill", "p-far", 2048, host="h2")
    books.register("decode", "d", 4)
    out: list = []
    books.frontend.submit("c1", generate(1), out.append)
    assert not books.sent and not books.frontend.streams and not books.router.waiting  # no silent fallback to tcp
    (error,) = out
    assert error.error_type == "unavailable" and "prefill worker p-far to decode worker d" in error.message
    books.register("prefill", "p-near", 2048)  # busier, but on the decode worker's host
    books.registry.workers["p-near"].queued_tokens = 10_000
    books.frontend.submit("c2", generate(2), out.append)
    ((worker, msg),) = books.sent
    assert worker == "p-near" and msg.transport == "shm"
