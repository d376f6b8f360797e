"""CUDA checks (skipped without a GPU): the varlen prefill kernels against SDPA, multi-query and
grouped-query, with and without a sliding window or a cached prefix, and the cuda_ipc KV handoff
between a prefill and a decode process, bytes and timing; the handoff's protocol runs over shm on
the CPU too.

The device pass (bench/gpu/device_pass.py) runs this file; what the tests measure reaches its
records through `record_property`."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import TEST_THREADS
from pair_child import pair_child
from splitserve.common.attention import (
    _flash_attn_prefill,
    _torch_varlen_prefill,
    choose_prefill_attention,
    packing,
    sdpa_prefill,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                    reason="needs two GPUs")

SEQLENS = [1, 7, 64, 300, 1000]  # packed back to back: T = 1372
PAST = [0, 40, 8, 0, 333]  # cached prefixes before them, for the bottom-right causal case
# (H, KVH, D): SantaCoder's, StarCoder's, multi-head, grouped-query (Llama-like), Qwen2.5-Coder-7B's
HEADS = [(16, 1, 128), (48, 1, 128), (4, 4, 64), (8, 2, 128), (28, 4, 128)]


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


@needs_cuda
def test_a_cuda_kernel_is_chosen(record_property):
    name, _ = choose_prefill_attention(torch.device("cuda"), head_dim=128)
    record_property("kernel", name)
    assert name != "sdpa"
    # heads wider than FlashAttention's go to SDPA, and capped scores (Gemma 2) to the flash-attn
    # package's kernel or SDPA's twin, never PyTorch's bundled kernel, which has no cap (nor sinks: gpt-oss)
    assert choose_prefill_attention(torch.device("cuda"), head_dim=576)[0] == "sdpa"
    assert choose_prefill_attention(torch.device("cuda"), head_dim=128, softcap=True)[0] in ("flash-attn varlen",
                                                                                              "sdpa")
    assert choose_prefill_attention(torch.device("cuda"), head_dim=64, sinks=True)[0] in ("flash-attn varlen", "sdpa")
    print(f"\nprefill attention on torch {torch.__version__}: {name}")


@needs_cuda
@pytest.mark.parametrize("attn", kernels())
@pytest.mark.parametrize("h, kvh, d", HEADS)
@pytest.mark.parametrize("past, window", [(None, 0), (None, 100), (PAST, 0), (PAST, 100)],
                         ids=["causal", "window", "cached-prefix", "cached-prefix-window"])
def test_varlen_prefill_matches_sdpa_on_a_packed_batch(attn, h, kvh, d, past, window, record_property):
    q, k, v, pk = packed(h, kvh, d, past)
    scale = d**-0.5
    got = attn(q, k, v, pk, scale, window)  # [T, H, D]
    # The reference sees the same bf16 inputs, computed in fp32, K/V repeated for every query head.
    want = sdpa_prefill(q.float(), k.float(), v.float(), pk, scale, window)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    record_property("max_abs_diff", (got.float() - want).abs().max().item())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(_flash_attn_prefill() is None, reason="flash-attn varlen is not importable")
@needs_cuda  # nearest the function, so its reason is the one reported without CUDA (the device pass expects it)
@pytest.mark.parametrize("past, window", [(None, 0), (PAST, 100)], ids=["causal", "cached-prefix-window"])
def test_flash_attn_caps_scores_as_the_sdpa_twin_does(past, window, record_property):
    """Gemma 2's capped scores (c * tanh(s / c), here c = 5, low enough to bite) in the flash-attn
    package's kernel against the CPU twin's whole scores, computed in fp32."""
    q, k, v, pk = packed(8, 2, 128, past)
    scale = 128**-0.5
    got = _flash_attn_prefill()(q, k, v, pk, scale, window, 5.0)
    want = sdpa_prefill(q.float(), k.float(), v.float(), pk, scale, window, 5.0)
    record_property("max_abs_diff", (got.float() - want).abs().max().item())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(_flash_attn_prefill() is None, reason="flash-attn varlen is not importable")
@needs_cuda  # nearest the function, as above
@pytest.mark.parametrize("past, window", [(None, 0), (PAST, 100)], ids=["causal", "cached-prefix-window"])
def test_flash_attn_with_sinks_equals_the_sdpa_twin(past, window, record_property):
    """gpt-oss's attention sinks: the flash-attn package's output scaled by each row's share without
    the sink (from the kernel's log-sum-exp) against the CPU twin's whole scores with the sink
    logit, computed in fp32; sinks from -2 to 4, some outweighing the keys."""
    q, k, v, pk = packed(8, 2, 64, past)
    scale, sinks = 64**-0.5, torch.linspace(-2.0, 4.0, 8, device="cuda")
    got = _flash_attn_prefill()(q, k, v, pk, scale, window, sinks=sinks)
    want = sdpa_prefill(q.float(), k.float(), v.float(), pk, scale, window, sinks=sinks)
    record_property("max_abs_diff", (got.float() - want).abs().max().item())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("h, kvh", [(16, 1), (8, 2)])
def test_torchs_flash_op_takes_fewer_kv_heads_as_they_are(h, kvh, record_property):
    # What 2.11's path relies on: the op that varlen_attn wraps, given fewer K/V heads than query
    # heads, computes what it computes on K/V repeated for every query head of a group.
    q, k, v, pk = packed(h, kvh, 128)
    cu, n = pk.cu_q, max(SEQLENS)

    def op(k, v):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, 0.0, True, False, scale=0.125)[0]

    got, want = op(k, v), op(k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1))
    record_property("max_abs_diff", (got.float() - want.float()).abs().max().item())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_cuda
@pytest.mark.parametrize("family", ["tiny", "deepseek-v2-tiny"])
def test_model_prefill_with_the_chosen_kernel_matches_sdpa(tiny_dir, family, record_property):
    """The tiny model, and latent attention's heads expanded from the cached vectors (values
    zero-padded to the keys' width)."""
    from splitserve.common.loading import load_model
    from splitserve.common.model import prefill
    from test_cuda_graphs import shaped_model

    if family == "tiny":
        lm = load_model(tiny_dir, torch.bfloat16, torch.device("cuda"), progress=False)
    else:
        lm = shaped_model("cuda", torch.bfloat16, family)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, lm.cfg.vocab_size, (sum(SEQLENS),), generator=gen).cuda()
    positions = torch.cat([torch.arange(n) for n in SEQLENS]).cuda()
    _, attn = choose_prefill_attention(lm.device, lm.cfg.prefill_width)
    with torch.inference_mode():
        got = prefill(lm.weights, ids, positions, SEQLENS, attn)  # [B, V]
        want = prefill(lm.weights, ids, positions, SEQLENS, sdpa_prefill)
    record_property("max_abs_diff", (got.float() - want.float()).abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---- the KV handoff between processes: cuda_ipc, and its protocol over shm ------------------

SANTACODER_KV = (24, 2, 2048, 1, 128)  # staging [n_layer, 2, budget, KVH, D]
PROMPT = 1024
RUNS = {"cuda_ipc": 20, "shm": 3}  # timed handoffs: shm runs for its protocol on the CPU, not its time

# The decode side: open the staging once, then for each location copy the region into a slot of
# its own pool as DecodeEngine.admit does ([.., slot, KVH, L, D] <- [.., n, KVH, D]), synchronize,
# and answer with the time that took and either the copied bytes or a checksum of them.
DECODE_CHILD = r"""
import sys, time
import msgspec, torch, zmq
from splitserve.common.kv_transport import KvImporter

port, device, threads = int(sys.argv[1]), torch.device(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
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
    sync(device)
    start = time.perf_counter()
    importer.open(desc)  # cached: a second open costs a dict lookup
    kv = importer.view(desc["transport"], desc["key"], offset, length)
    slot = pool[:, :, 0, :, :length]
    slot.copy_(kv.transpose(2, 3))
    sync(device)
    elapsed = time.perf_counter() - start
    region = slot.transpose(2, 3).contiguous()
    answer = region.cpu().view(torch.uint8).numpy().tobytes() if want_bytes else checksum(region)
    sock.send(msgspec.msgpack.encode([elapsed, answer]))
importer.close()
"""


def checksum(t: torch.Tensor) -> int:
    """Exact, and the same in both processes: the bf16 bit patterns summed as integers."""
    return int(t.view(torch.int16).to(torch.int64).sum())


# (transport, staging device, decode device)
HANDOFFS = [pytest.param("shm", "cpu", "cpu", id="shm"),
            pytest.param("cuda_ipc", "cuda:0", "cuda:0", id="cuda_ipc-cuda:0", marks=needs_cuda),
            pytest.param("cuda_ipc", "cuda:0", "cuda:1", id="cuda_ipc-cuda:1", marks=needs_two_gpus)]


@pytest.mark.parametrize("transport, source, decode_device", HANDOFFS)
def test_kv_handoff_of_a_1024_token_prompt(transport, source, decode_device, record_property):
    import msgspec

    from splitserve.common.kv_transport import allocate_staging

    cuda = transport == "cuda_ipc"
    staging = allocate_staging(SANTACODER_KV, torch.bfloat16, source, transport, "prefill-gpu")
    region = staging.tensor[:, :, 512 : 512 + PROMPT]  # not at offset 0: offsets must be honoured
    nbytes = region.numel() * region.element_size()
    try:
        with pair_child(DECODE_CHILD, decode_device, str(TEST_THREADS), timeout_s=60) as sock:
            sock.send(msgspec.msgpack.encode(staging.export()))
            assert sock.recv() == b"opened"

            def handoff(want_bytes: bool):
                sock.send(msgspec.msgpack.encode([512, PROMPT, want_bytes]))
                return msgspec.msgpack.decode(sock.recv())

            if cuda:
                # Ordering: the write is still queued behind a ~0.1 s kernel when the location is
                # sent; only the interprocess event keeps the child from reading the old bytes.
                region.zero_()
                torch.cuda.synchronize()
                torch.cuda._sleep(200_000_000)
            region.normal_()
            staging.record_write()
            _, got = handoff(True)
            bytes_equal = got == region.contiguous().cpu().view(torch.uint8).numpy().tobytes()
            record_property("bytes_equal", bytes_equal)
            assert bytes_equal

            child_s, round_trip_s = [], []
            for _ in range(RUNS[transport]):
                region.normal_()
                staging.record_write()
                if cuda:
                    torch.cuda.synchronize()  # time the handoff, not the write
                start = time.perf_counter()
                elapsed, sum_ = handoff(False)
                round_trip_s.append(time.perf_counter() - start)
                child_s.append(elapsed)
                assert sum_ == checksum(region)
    finally:
        staging.close()
    copy_s = statistics.median(child_s)
    record_property("mib", round(nbytes / 2**20, 1))
    record_property("copy_ms", round(1e3 * copy_s, 4))
    record_property("copy_gb_s", round(nbytes / copy_s / 1e9, 1))
    record_property("round_trip_ms", round(1e3 * statistics.median(round_trip_s), 4))
    print(f"\n{transport} handoff {source} -> {decode_device}, {PROMPT} tokens of SantaCoder KV "
          f"({nbytes / 2**20:.1f} MiB): copy {1e3 * copy_s:.3f} ms median ({nbytes / copy_s / 1e9:.0f} GB/s), "
          f"with the ZMQ round trip {1e3 * statistics.median(round_trip_s):.3f} ms, over {RUNS[transport]} handoffs")
