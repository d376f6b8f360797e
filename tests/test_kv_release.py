"""The decode side's KvRelease: a copy into a slot frees the sender's staging region only once it has
completed, and the decode worker never waits for it (no host sync per admission). A real sender
and receiver in one process, over real sockets."""

from __future__ import annotations

import pytest
import torch
import zmq

from polling import wait_for
from splitserve.common import protocol as P
from splitserve.common.kv_handoff import KvReceiver, KvSender
from splitserve.common.kv_transport import allocate_staging
from splitserve.common.request import GenerateRequest

torch.set_num_threads(1)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N_LAYER, KVH, D, BUDGET = 2, 2, 8, 16
SHAPE = (N_LAYER, 2, BUDGET, KVH, D)  # staging [n_layer, 2, budget, KVH, D]


@pytest.fixture
def pair(request):
    """(sender, receiver, pool, transport): shm staging on the CPU (tcp frames to a GPU receiver),
    and a decode pool [n_layer, 2, slots, KVH, L, D] on the receiver's device."""
    device = torch.device(getattr(request, "param", "cpu"))
    transport = "shm" if device.type == "cpu" else "tcp"
    ctx = zmq.Context()
    staging = allocate_staging(SHAPE, torch.float32, "cpu", transport, "p")
    staging.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))
    sender = KvSender(ctx, staging, "p", None)
    receiver = KvReceiver(ctx, "127.0.0.1", 0, "127.0.0.1", None, device, torch.float32)
    pool = torch.zeros(N_LAYER, 2, 2, KVH, BUDGET, D, device=device)
    try:
        yield sender, receiver, pool, transport
    finally:
        sender.close()
        receiver.close()
        ctx.term()


def hand_off(sender: KvSender, receiver: KvReceiver, transport: str, rid: str, n: int) -> None:
    request = GenerateRequest(rid, tuple(range(n)), 4)
    offset = sender.regions.alloc(n)
    sender.send(P.Prefill(request, "d", receiver.endpoint, transport), request, 1, "x", offset, n)


def arrivals(receiver: KvReceiver, count: int):
    got = []
    wait_for(lambda: got.extend(receiver.receive()) or len(got) >= count, 10, f"{count} arrivals")
    return got


def handoffs_left(sender: KvSender) -> set[str]:
    """The sender's handoffs not yet released, after taking every release that came (none failed)."""
    failed, _ = sender.receive(sender.sockets[0])
    assert not failed
    return set(sender.handoffs)


def test_copies_are_released_once_sent_and_answers_at_once(pair):
    sender, receiver, pool, transport = pair
    for rid, n in (("a", 5), ("b", 3), ("c", 4)):
        hand_off(sender, receiver, transport, rid, n)
    a, b, c = arrivals(receiver, 3)
    for slot, arrival in enumerate((a, b)):
        receiver.filler(arrival)(pool[:, :, slot, :, : arrival.ready.location.length])
        receiver.copied(arrival)
    assert receiver.unreleased
    receiver.answer(c)  # a request cancelled before its KV came: its region is free at once
    wait_for(lambda: handoffs_left(sender) == {"a", "b"}, 10, "c's release")
    assert sender.regions.free_tokens == BUDGET - 8  # the copies wait for send_releases

    out = receiver.send_releases()
    assert [arrival.ready.request.id for arrival, _ in out] == ["a", "b"] and all(s >= 0 for _, s in out)
    assert not receiver.unreleased and receiver.send_releases() == []
    wait_for(lambda: not handoffs_left(sender), 10, "the copies' releases")
    assert sender.regions.free_tokens == BUDGET
    staged = sender.staging.tensor
    assert torch.equal(pool[:, :, 0, :, :5].cpu(), staged[:, :, 0:5].transpose(2, 3))
    assert torch.equal(pool[:, :, 1, :, :3].cpu(), staged[:, :, 5:8].transpose(2, 3))


@needs_cuda
@pytest.mark.parametrize("pair", ["cuda"], indirect=True)
def test_on_a_gpu_a_release_waits_for_the_stream_and_the_host_does_not(pair):
    sender, receiver, pool, transport = pair
    hand_off(sender, receiver, transport, "a", 5)
    (a,) = arrivals(receiver, 1)
    receiver.filler(a)(pool[:, :, 0, :, :5])
    torch.cuda._sleep(500_000_000)  # the stream stays busy well after the copy is queued
    receiver.copied(a)
    assert receiver.send_releases() == []  # returned at once, nothing released
    assert receiver.unreleased
    torch.cuda.synchronize()
    assert [arrival.ready.request.id for arrival, _ in receiver.send_releases()] == ["a"]
    wait_for(lambda: not handoffs_left(sender), 10, "the release")
    assert torch.equal(pool[:, :, 0, :, :5].cpu(), sender.staging.tensor[:, :, 0:5].transpose(2, 3))


def test_over_tcp_a_windowed_layer_sends_only_its_last_ring():
    """A layer whose keys the decode side keeps in a ring of 4 sends a prompt's last 4 tokens over
    tcp, the other layer all 7; the receiver's view has them in place (the rest zeros, never read)
    and both sides count what crossed. Frames that do not add up are refused."""
    ctx = zmq.Context()
    staging = allocate_staging(SHAPE, torch.float32, "cpu", "tcp", "p")
    staging.tensor.copy_(torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)))
    sender = KvSender(ctx, staging, "p", None, keys=(4, BUDGET))
    receiver = KvReceiver(ctx, "127.0.0.1", 0, "127.0.0.1", None, torch.device("cpu"), torch.float32)
    try:
        assert sender.kept(3) == () and sender.kept(7) == (4, 7)  # short prompts send every token
        hand_off(sender, receiver, "tcp", "a", 7)
        (a,) = arrivals(receiver, 1)
        assert a.ready.kept == (4, 7) and sum(f.nbytes for f in a.frames) == 11 * 2 * KVH * D * 4
        kv, staged = receiver.kv(a), staging.tensor[:, :, :7]  # [n_layer, 2, 7, KVH, D]
        assert torch.equal(kv[0, :, 3:], staged[0, :, 3:]) and not kv[0, :, :3].any()
        assert torch.equal(kv[1], staged[1])
        receiver.copied(a)
        receiver.send_releases()
        done = []
        wait_for(lambda: done.extend(sender.receive(sender.sockets[0])[1]) or done, 10, "the release")
        assert done[0].nbytes == 11 * 2 * KVH * D * 4
        for kept in ((4,), (8, 7), (0, 7), (4, 6)):
            a.ready.kept = kept
            with pytest.raises(ValueError, match="KV frames"):
                receiver.kv(a)
    finally:
        sender.close()
        receiver.close()
        ctx.term()
