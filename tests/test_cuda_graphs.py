"""Decode at fixed shapes (decode_worker/step_runner.py): the padded static-buffer step gives the
tokens of the exact one. On the CPU the step runs eagerly, as its graphs would replay it; the
CUDA tests capture the graphs and compare replay with eager. The device pass
(bench/gpu/device_pass.py) runs the CUDA tests and their CPU twins, their `record_property`
numbers in its records."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import load_cpu, req, run_staggered
from splitserve.common.loading import LoadedModel, load_model
from splitserve.common.model import decode_buffers
from splitserve.common.request import GenerateRequest
from splitserve.common.params import SamplingParams
from splitserve.decode_worker.step_runner import StepRunner, batch_buckets, key_buckets
from splitserve.decode_worker.engine import DecodeEngine
from splitserve.engine import Engine, EngineOptions, GenerateResult

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SLOTS, SLOT_LEN, KEY_STEP = 6, 512, 64  # batch buckets 1, 2, 4, 6; key buckets 64, 128, ... 512


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_cpu(tiny_dir)


def shaped_model(device: str, dtype: torch.dtype, shape: str = "llama-tiny") -> LoadedModel:
    """Random weights of one of engine_bench's shapes, large enough that the logits are not flat:
    llama-tiny for the grouped-query, rotary families' path (8 query and 2 KV heads), qwen3-moe-tiny
    for a mixture of experts, deepseek-v2-tiny for latent attention (and shared experts), phi3-tiny
    for rotary embeddings that turn part of each head (and LongRoPE), glm4-tiny for sandwich norms,
    gemma2-tiny for capped attention scores and logits (and windows on every other layer), gemma3-tiny
    for windowed layers with rotary embeddings of their own, ministral3-tiny for queries scaled by
    position (Llama 4's attention temperature), gpt-oss-tiny for attention sinks (and experts with
    biases and a clamped SwiGLU), starcoder2-tiny for slots that keep only the ring of its window
    on every layer."""
    from splitserve.bench.engine_bench import SHAPES
    from splitserve.common.families import checkpoint_shapes
    from splitserve.common.model import prepare_weights
    from splitserve.common.model_config import model_config_from_dict
    from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer

    cfg = model_config_from_dict(SHAPES[shape])
    gen = torch.Generator().manual_seed(7)
    weights = {name: (0.08 * torch.randn(dims, generator=gen) if len(dims) >= 2  # norms near 1 (and 1-D biases)
                      else 1 + 0.1 * torch.randn(dims, generator=gen)).to(device, dtype)
               for name, dims in checkpoint_shapes(cfg).items()}
    with torch.inference_mode():
        prepared = prepare_weights(weights, cfg)
    tokenizer = Tokenizer.from_file(TINY_TOKENIZER_PATH)
    return LoadedModel(Path(f"{shape}-shape"), cfg, prepared, tokenizer, torch.device(device), dtype)


MOE, LATENT, PARTIAL, SANDWICH, CAPPED = "qwen3-moe-tiny", "deepseek-v2-tiny", "phi3-tiny", "glm4-tiny", "gemma2-tiny"
LOCAL_ROPE, TEMPERATURE, SINKS, RING_SLOTS = "gemma3-tiny", "ministral3-tiny", "gpt-oss-tiny", "starcoder2-tiny"
FAMILIES = ["llama-gqa", MOE, LATENT, PARTIAL, SANDWICH, CAPPED, LOCAL_ROPE, TEMPERATURE, SINKS, RING_SLOTS]


@pytest.fixture(scope="module", params=["gpt_bigcode", *FAMILIES])
def lm_family(request, tiny_dir):
    """fp32 on the CPU: the tiny multi-query model, the grouped-query rotary one, and one each with
    experts, latent attention, partial rotary embeddings, sandwich norms, capped scores, two rotary
    embeddings, scaled queries, attention sinks, ring-long slots."""
    if request.param == "gpt_bigcode":
        return load_cpu(tiny_dir)
    return shaped_model("cpu", torch.float32, "llama-tiny" if request.param == "llama-gqa" else request.param)


def sampled(i: int, n: int, new: int, **kw) -> GenerateRequest:
    return req(i, n, new, sampling=SamplingParams(do_sample=True, seed=50 + i, temperature=0.8, top_p=0.9), **kw)


# Requests join and leave so that the slot prefix grows, shrinks, has holes, and crosses key
# buckets (prompts up to 200 tokens, 60 more); slot 5 in use makes B the non-power-of-two 6.
GREEDY_SCHEDULE = {
    0: [req(0, 30, 40), req(1, 5, 6)],
    3: [req(2, 120, 20), req(3, 1, 50), req(4, 60, 9)],
    8: [req(5, 200, 30), req(6, 17, 12), req(7, 3, 25)],
    20: [req(8, 63, 60)],
}
MIXED_SCHEDULE = {
    0: [sampled(10, 40, 30), req(11, 25, 20, logprobs=True, top_n_tokens=2)],
    4: [req(12, 90, 25, sampling=SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2)), sampled(13, 7, 40)],
    10: [req(14, 130, 15)],
}


def engine_for(lm, steps: str) -> Engine:
    """steps: "exact" for the exact path, "eager" for the padded path run eagerly, "graphs" for it
    captured (CUDA)."""
    # cuda_graphs=False: the Engine's own decode is the exact path on CUDA too (it captures by default)
    engine = Engine(lm, EngineOptions(num_slots=SLOTS, max_total_tokens=SLOT_LEN, cuda_graphs=False))
    if steps == "graphs":
        engine.decode = DecodeEngine(lm, SLOTS, SLOT_LEN, graphs=True, graph_key_step=KEY_STEP)
    elif steps == "eager":
        d = engine.decode
        d.runner = StepRunner.graphs(lm.weights, d.kv.layers, d.tokens, d.positions, KEY_STEP, capture=False,
                                     slot_len=d.slot_len)
    return engine


def record_shapes(runner: StepRunner) -> list[tuple[int, int]]:
    """(slot prefix, batch bucket) of every step the runner takes from now on."""
    seen, step = [], runner.run

    def recorded(prefix: int, longest: int):
        out = step(prefix, longest)
        seen.append((prefix, out[0]))
        return out

    runner.run = recorded
    return seen


def assert_same(got: dict[str, GenerateResult], want: dict[str, GenerateResult], logprob_tol: float,
                record_property=None) -> None:
    assert got.keys() == want.keys()
    if record_property is not None:  # the numbers, before any assertion can stop the test
        record_property("tokens", sum(len(w.token_ids) for w in want.values()))
        record_property("tokens_differing", sum(g != w for r in want for g, w in zip(got[r].token_ids, want[r].token_ids)))
        diffs = [abs(g - w) for r in want for g, w in zip(got[r].logprobs or (), want[r].logprobs or ())]
        record_property("max_logprob_diff", max(diffs, default=0.0))
    for rid, w in want.items():
        g = got[rid]
        assert g.token_ids == w.token_ids, rid
        assert g.finish_reason == w.finish_reason == "length", rid
        assert g.logprobs == pytest.approx(w.logprobs, abs=logprob_tol), rid


# ---- buckets ------------------------------------------------------------------------------


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(256) == [1 << i for i in range(9)]
    assert key_buckets(512, 64) == [64 * i for i in range(1, 9)]
    assert key_buckets(1000, 256) == [256, 512, 768, 1000]
    assert key_buckets(100, 256) == [100]
    with pytest.raises(ValueError, match="multiple of 8"):
        key_buckets(512, 100)


def test_a_step_takes_the_smallest_buckets_that_hold_it(lm):
    d = DecodeEngine(lm, SLOTS, SLOT_LEN)
    padded = StepRunner.graphs(lm.weights, d.kv.layers, d.tokens, d.positions, KEY_STEP, capture=False,
                               slot_len=d.slot_len)
    assert padded.shape(1, 1) == (1, 64)
    assert padded.shape(3, 64) == (4, 64)
    assert padded.shape(5, 65) == (6, 128)
    assert padded.shape(6, SLOT_LEN) == (6, SLOT_LEN)
    exact = StepRunner.exact(lm.weights, d.kv.layers, d.tokens, d.positions, 8, d.slot_len)
    assert exact.shape(3, 64) == (3, 64) and exact.shape(5, 65) == (5, 72)
    with pytest.raises(ValueError, match="exceed the pool"):
        StepRunner(lm.weights, d.kv.layers, d.tokens, d.positions, [8], [64])


def test_eager_steps_keep_the_views_of_the_latest_shapes(lm, monkeypatch):
    monkeypatch.setattr("splitserve.decode_worker.step_runner.EAGER_SHAPES", 2)
    d = admitted(lm, [70, 3])
    runner, made = d.runner, []
    eager = runner._eager
    monkeypatch.setattr(runner, "_eager", lambda b, k: made.append((b, k)) or eager(b, k))
    for longest in (71, 90, 71, 100, 71):  # key buckets 72, 96, 72 (kept), 104 (72 made first: out), 72
        runner.run(2, longest)
    assert made == [(2, 72), (2, 96), (2, 104), (2, 72)] and runner.shapes == [(2, 104), (2, 72)]


# ---- the CPU twin: padded, static buffers, run eagerly --------------------------------------


def admitted(lm, lens: list[int]) -> DecodeEngine:
    """A decode engine with one request per length, each slot's KV random."""
    cfg = lm.cfg
    d = DecodeEngine(lm, SLOTS, SLOT_LEN)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(lens):
        kv = torch.randn(cfg.n_layer, 2, n, cfg.kv_heads, cfg.head_dim, generator=gen)
        d.admit(req(i, n, 8), kv, first_token=100 + i)
    return d


def test_padded_logits_equal_the_exact_ones(lm_family, record_property):
    lm = lm_family
    d = admitted(lm, [70, 3, 200, 129, 64])
    d.release(2)  # a hole in the prefix of 5, which pads to the bucket of 6
    b, exact, greedy = d.runner.run(d.slots.prefix_len(), d.longest())
    assert b == 5 and greedy is None  # eager steps leave the argmax to sampling
    exact = exact.clone()  # [5, V]
    padded = StepRunner.graphs(lm.weights, d.kv.layers, d.tokens, d.positions, KEY_STEP, capture=False,
                               slot_len=d.slot_len)
    # Both write the same K/V at the same positions, so running one after the other is fair.
    b, logits, greedy = padded.run(d.slots.prefix_len(), d.longest())
    # 130 keys, slot 3; a ring-long slot (a window on every layer) steps at its ring's bucket
    ring_long = max(k.shape[3] for k in d.kv.layers) < SLOT_LEN
    assert b == 6 and padded.shape(5, d.longest()) == (6, 64 if ring_long else 192)
    record_property("max_abs_diff", (logits[:5] - exact).abs().max().item())
    torch.testing.assert_close(logits[:5], exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy[:5], exact.argmax(-1))


def test_windowed_layers_read_only_their_ring():
    """A windowed layer's slots hold its ring (the window rounded up to 8), which its step reads at
    any longer key bucket, the other layers the whole bucket; the test above and
    tests/test_families.py check what the steps compute."""
    lm = shaped_model("cpu", torch.float32, SINKS)
    assert set(lm.cfg.windows) == {0, 64}  # on every other layer
    d = DecodeEngine(lm, 2, SLOT_LEN)
    keys = [64 if window else SLOT_LEN for window in lm.cfg.windows]
    assert [layer.shape[3] for layer in d.kv.layers] == keys
    assert d.kv.flat.numel() == sum(keys) * 2 * 2 * lm.cfg.kv_dim  # 2 slots, K and V
    for key_len in (48, SLOT_LEN):
        bufs = decode_buffers(lm.cfg, d.kv.layers, d.runner.scratch, 2, key_len)
        want = [min(key_len, 64) if window else key_len for window in lm.cfg.windows]
        assert [k.shape[-1] for k in bufs.keys_t] == [s.shape[-1] for s in bufs.scores] == want


def test_padded_static_step_gives_the_exact_steps_tokens(lm):
    want = run_staggered(engine_for(lm, "exact"), GREEDY_SCHEDULE)
    engine = engine_for(lm, "eager")
    shapes = record_shapes(engine.decode.runner)
    got = run_staggered(engine, GREEDY_SCHEDULE)
    assert_same(got, want, 0)
    assert any(b > prefix for prefix, b in shapes), "no step ran past the slot prefix"
    assert (6, 6) in shapes or (5, 6) in shapes, "the last bucket is the slot count"
    # Rows past the prefix are free rows: they never advanced, and every slot ended free.
    assert not engine.decode.requests and engine.decode.positions.eq(0).all()


def test_sampling_penalties_and_details_run_outside_the_step(lm):
    # Rows that sample, carry penalties or want logprobs take `sample` on the padded logits.
    want = run_staggered(engine_for(lm, "exact"), MIXED_SCHEDULE)
    got = run_staggered(engine_for(lm, "eager"), MIXED_SCHEDULE)
    assert_same(got, want, 1e-4)


def test_graphs_need_cuda(lm):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeEngine(lm, 2, 64, graphs=True)


# ---- CUDA: captured graphs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_cuda(tiny_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    models = {dtype: load_model(tiny_dir, dtype, torch.device("cuda"), progress=False)
              for dtype in (torch.float32, torch.bfloat16)}
    models["llama-gqa"] = shaped_model("cuda", torch.bfloat16)
    for family in FAMILIES[1:]:
        models[family] = shaped_model("cuda", torch.bfloat16, family)
    return models


@needs_cuda
def test_every_shape_is_captured_largest_first_in_one_pool(lm_cuda, record_property):
    lm = lm_cuda[torch.bfloat16]
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    d = DecodeEngine(lm, SLOTS, SLOT_LEN, graphs=True, graph_key_step=KEY_STEP)
    record_property("capture_s", round(time.perf_counter() - start, 3))
    record_property("graphs", len(d.runner.shapes))
    record_property("pool_and_graphs_mib", round((free - torch.cuda.mem_get_info()[0]) / 2**20, 1))
    assert d.runner.captured
    assert d.runner.shapes == [(b, k) for b in (6, 4, 2, 1) for k in range(512, 0, -64)]


@needs_cuda
@pytest.mark.parametrize("family", [torch.bfloat16, *FAMILIES], ids=["gpt_bigcode", *FAMILIES])
@pytest.mark.parametrize("schedule", [GREEDY_SCHEDULE, MIXED_SCHEDULE], ids=["greedy", "mixed"])
def test_graph_replay_gives_the_eager_tokens(lm_cuda, family, schedule, record_property):
    lm = lm_cuda[family]
    # Same shapes, same kernels: the tokens agree; logprobs to within a change of GEMM algorithm.
    assert_same(run_staggered(engine_for(lm, "graphs"), schedule), run_staggered(engine_for(lm, "eager"), schedule),
                1e-3, record_property)


@needs_cuda
def test_graphs_give_the_exact_paths_tokens_in_fp32(lm_cuda, record_property):
    # Other shapes than the exact path's; fp32 (no TF32 by default) keeps argmax ties away.
    lm = lm_cuda[torch.float32]
    assert_same(run_staggered(engine_for(lm, "graphs"), GREEDY_SCHEDULE),
                run_staggered(engine_for(lm, "exact"), GREEDY_SCHEDULE), 1e-4, record_property)


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def count_host_reads(monkeypatch) -> list[str]:
    """The calls that read a tensor's values on the host (each a sync with a GPU), from now on:
    a count that needs no GPU."""
    calls = []
    for name in HOST_READS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            calls.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("family", ["tiny", MOE, LATENT])
@pytest.mark.parametrize("steps", ["eager", pytest.param("graphs", marks=needs_cuda)])
def test_a_decode_step_syncs_with_the_host_once(request, steps, family, monkeypatch, record_property):
    """Counted twice on CUDA: the synchronizing operations that torch's sync debug mode reports,
    and the host reads of tensor values; on the CPU (the padded steps run eagerly) the latter. A
    mixture of experts routes its rows on the device too, latent attention has no reads of its own."""
    cuda = torch.cuda.is_available()
    if family != "tiny":
        model = request.getfixturevalue("lm_cuda")[family] if cuda else shaped_model("cpu", torch.float32, family)
    else:
        model = request.getfixturevalue("lm_cuda")[torch.bfloat16] if cuda else request.getfixturevalue("lm")
    engine = engine_for(model, steps)
    for i in range(3):
        engine.submit(req(i, 20 + i, 40))
    engine.step()  # prefill and admission happen here; the steps below only decode
    if cuda:
        torch.cuda.synchronize()
    n = 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reads = count_host_reads(monkeypatch)
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                engine.decode.step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            monkeypatch.undo()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    record_property("steps", n)
    record_property("host_reads", len(reads))
    if cuda:
        record_property("cuda_syncs", len(syncs))
        assert len(syncs) == n, syncs
    assert reads == ["tolist"] * n
