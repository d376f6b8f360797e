"""CUDA-only checks (skipped without a GPU): the varlen prefill kernels against SDPA, and the
cuda_ipc KV handoff between a prefill and a decode process, bytes and timing.

The device pass runs this file with -s, so the handoff timings reach its log."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from pair_child import pair_child
from splitserve.common.attention import (
    _flash_attn_prefill,
    _torch_varlen_prefill,
    choose_prefill_attention,
    packing,
    sdpa_prefill,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SEQLENS = [1, 7, 64, 300, 1000]  # packed back to back: T = 1372
PAST = [0, 40, 8, 0, 333]  # cached prefixes before them, for the bottom-right causal case
# (H, KVH, D): SantaCoder's, StarCoder's, multi-head, Qwen2.5-Coder-7B's grouped-query
HEADS = [(16, 1, 128), (48, 1, 128), (4, 4, 64), (28, 4, 128)]


def packed(h: int, kvh: int, d: int, past: list[int] | None = None, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(h * 1000 + kvh * 10 + d)
    pk = packing(SEQLENS, past, "cuda")
    q = torch.randn(sum(pk.seqlens_q), h, d, generator=gen, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(pk.seqlens_k), kvh, d, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v, pk


def kernels() -> list:
    made = [("torch varlen", _torch_varlen_prefill()), ("flash-attn varlen", _flash_attn_prefill())]
    return [pytest.param(fn, id=name, marks=pytest.mark.skipif(fn is None, reason=f"{name} is not importable"))
            for name, fn in made]


# ---- prefill attention --------------------------------------------------------------------


def test_a_cuda_kernel_is_chosen():
    name, _ = choose_prefill_attention(torch.device("cuda"))
    assert name != "sdpa"
    print(f"\nprefill attention on torch {torch.__version__}: {name}")


@pytest.mark.parametrize("attn", kernels())
@pytest.mark.parametrize("h, kvh, d", HEADS)
@pytest.mark.parametrize("past, window", [(None, 0), (None, 100), (PAST, 0), (PAST, 100)],
                         ids=["causal", "window", "cached-prefix", "cached-prefix-window"])
def test_varlen_prefill_matches_sdpa_on_a_packed_batch(attn, h, kvh, d, past, window):
    q, k, v, pk = packed(h, kvh, d, past)
    scale = d**-0.5
    got = attn(q, k, v, pk, scale, window)  # [T, H, D]
    # The reference sees the same bf16 inputs, computed in fp32.
    want = sdpa_prefill(q.float(), k.float(), v.float(), pk, scale, window)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_torchs_flash_op_takes_multi_query_kv_as_it_is():
    # What 2.11's path relies on: the op that varlen_attn wraps, given one K/V head for 16 query
    # heads, computes what it computes on K/V expanded to every head.
    q, k, v, pk = packed(16, 1, 128)
    cu, n = pk.cu_q, max(SEQLENS)

    def op(k, v):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, True, False, scale=0.125)[0]

    torch.testing.assert_close(op(k, v), op(k.expand(-1, 16, -1), v.expand(-1, 16, -1)), atol=0, rtol=0)


def test_model_prefill_with_the_chosen_kernel_matches_sdpa(tiny_dir):
    from splitserve.common.loading import load_model
    from splitserve.common.model import prefill

    lm = load_model(tiny_dir, torch.bfloat16, torch.device("cuda"), progress=False)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, lm.cfg.vocab_size, (sum(SEQLENS),), generator=gen).cuda()
    positions = torch.cat([torch.arange(n) for n in SEQLENS]).cuda()
    _, attn = choose_prefill_attention(lm.device)
    with torch.inference_mode():
        got = prefill(lm.weights, ids, positions, SEQLENS, attn)  # [B, V]
        want = prefill(lm.weights, ids, positions, SEQLENS, sdpa_prefill)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---- cuda_ipc handoff between processes ---------------------------------------------------

SANTACODER_KV = (24, 2, 2048, 1, 128)  # staging [n_layer, 2, budget, KVH, D]
PROMPT = 1024
RUNS = 20

# The decode side: open the staging once, then for each location copy the region into a slot of
# its own pool as DecodeEngine.admit does ([.., slot, KVH, L, D] <- [.., n, KVH, D]), synchronize,
# and answer with the time that took and either the copied bytes or a checksum of them.
DECODE_CHILD = r"""
import sys, time
import msgspec, torch, zmq
from splitserve.common.kv_transport import KvImporter

port, device = int(sys.argv[1]), sys.argv[2]
sock = zmq.Context().socket(zmq.PAIR)
sock.setsockopt(zmq.RCVTIMEO, 60000)
sock.connect(f"tcp://127.0.0.1:{port}")
desc = msgspec.msgpack.decode(sock.recv())
importer = KvImporter(device, torch.bfloat16)
importer.open(desc)
n_layer, two, budget, kvh, d = desc["shape"]
pool = torch.empty(n_layer, two, 1, kvh, budget, d, dtype=torch.bfloat16, device=device)
sock.send(b"opened")


def checksum(t):
    return int(t.view(torch.int16).to(torch.int64).sum())


while True:
    msg = sock.recv()
    if not msg:
        break
    offset, length, want_bytes = msgspec.msgpack.decode(msg)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    importer.open(desc)  # cached: a second open costs a dict lookup
    kv = importer.view("cuda_ipc", desc["key"], offset, length)
    slot = pool[:, :, 0, :, :length]
    slot.copy_(kv.transpose(2, 3))
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    region = slot.transpose(2, 3).contiguous()
    answer = region.cpu().view(torch.uint8).numpy().tobytes() if want_bytes else checksum(region)
    sock.send(msgspec.msgpack.encode([elapsed, answer]))
importer.close()
"""


def checksum(t: torch.Tensor) -> int:
    """Exact, and the same in both processes: the bf16 bit patterns summed as integers."""
    return int(t.view(torch.int16).to(torch.int64).sum())


def decode_devices() -> list:
    two = torch.cuda.is_available() and torch.cuda.device_count() > 1
    return ["cuda:0", pytest.param("cuda:1", marks=pytest.mark.skipif(not two, reason="needs two GPUs"))]


@pytest.mark.parametrize("decode_device", decode_devices())
def test_cuda_ipc_handoff_of_a_1024_token_prompt(decode_device):
    import msgspec

    from splitserve.common.kv_transport import allocate_staging

    staging = allocate_staging(SANTACODER_KV, torch.bfloat16, "cuda:0", "cuda_ipc", "prefill-gpu")
    region = staging.tensor[:, :, 512 : 512 + PROMPT]  # not at offset 0: offsets must be honoured
    nbytes = region.numel() * region.element_size()
    with pair_child(DECODE_CHILD, decode_device, timeout_s=60) as sock:
        sock.send(msgspec.msgpack.encode(staging.export()))
        assert sock.recv() == b"opened"

        def handoff(want_bytes: bool):
            sock.send(msgspec.msgpack.encode([512, PROMPT, want_bytes]))
            return msgspec.msgpack.decode(sock.recv())

        # Ordering: the write is still queued behind a ~0.1 s kernel when the location is sent;
        # only the interprocess event keeps the child from reading the old bytes.
        region.zero_()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)
        region.normal_()
        staging.record_write()
        _, got = handoff(True)
        assert got == region.contiguous().cpu().view(torch.uint8).numpy().tobytes()

        child_s, round_trip_s = [], []
        for _ in range(RUNS):
            region.normal_()
            staging.record_write()
            torch.cuda.synchronize()  # time the handoff, not the write
            start = time.perf_counter()
            elapsed, sum_ = handoff(False)
            round_trip_s.append(time.perf_counter() - start)
            child_s.append(elapsed)
            assert sum_ == checksum(region)
    staging.close()
    print(f"\ncuda_ipc handoff cuda:0 -> {decode_device}, {PROMPT} tokens of SantaCoder KV "
          f"({nbytes / 2**20:.1f} MiB): copy {1e3 * statistics.median(child_s):.3f} ms median "
          f"({nbytes / statistics.median(child_s) / 1e9:.0f} GB/s), with the ZMQ round trip "
          f"{1e3 * statistics.median(round_trip_s):.3f} ms, over {RUNS} handoffs")
