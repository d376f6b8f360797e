"""The in-process Engine: continuous batching, seeded sampling, stops, limits, details."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_model, load_cpu, prompt, req, run_staggered
from splitserve.common.params import Finish, SamplingParams, ValidationError
from splitserve.common.request import GenerateRequest
from splitserve.engine import Engine, EngineOptions, GenerateResult


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_cpu(tiny_dir)


def alone(lm, request: GenerateRequest) -> GenerateResult:
    return Engine(lm, EngineOptions(num_slots=1, max_total_tokens=512)).generate([request])[0]


def test_requests_joining_and_leaving_get_their_solo_tokens(lm):
    # 4 slots for 10 requests: slots are reused after finishing, so stale KV would show here.
    schedule = {
        0: [req(0, 30, 20), req(1, 5, 3)],
        2: [req(2, 60, 12), req(3, 1, 25)],
        5: [req(4, 17, 8), req(5, 90, 5), req(6, 3, 30)],
        9: [req(7, 44, 16)],
        14: [req(8, 120, 10), req(9, 2, 2)],
    }
    engine = Engine(lm, EngineOptions(num_slots=4, max_total_tokens=512))
    results = run_staggered(engine, schedule)
    for requests in schedule.values():
        for r in requests:
            solo = alone(lm, r)
            assert results[r.id].token_ids == solo.token_ids, r.id
            assert len(solo.token_ids) == r.max_new_tokens
            assert results[r.id].finish_reason == "length"
    assert engine.decode.free_slots == 4 and not engine.decode.requests


def test_greedy_engine_matches_transformers(lm, tiny_dir):
    r = req(42, 40, 48)
    with torch.inference_mode():
        ids = torch.tensor([r.prompt_ids])
        expected = hf_model(tiny_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                               min_new_tokens=48, do_sample=False, pad_token_id=0)
    assert alone(lm, r).token_ids == expected[0, 40:].tolist()


def sampled(i: int, seed: int, **params) -> GenerateRequest:
    sp = SamplingParams(do_sample=True, seed=seed, **params)
    return req(i, 10 + 7 * (i % 5), 24, sampling=sp)


def test_seeded_sampling_is_batch_invariant(lm):
    target = sampled(0, seed=7, temperature=0.9, top_k=40, top_p=0.95)
    solo = alone(lm, target).token_ids
    assert alone(lm, target).token_ids == solo  # reproducible
    for size in (3, 16):
        others = [sampled(i, seed=100 + i, temperature=0.5 + 0.1 * (i % 6), top_p=0.9) for i in range(1, size)]
        batch = others[: size // 2] + [target] + others[size // 2 :]
        engine = Engine(lm, EngineOptions(num_slots=size, max_total_tokens=512))
        out = {r.request_id: r for r in engine.generate(batch)}
        assert out[target.id].token_ids == solo, f"batch of {size}"
    assert alone(lm, sampled(0, seed=8, temperature=0.9, top_k=40, top_p=0.95)).token_ids != solo


def test_stop_string_kept_or_stripped_and_slot_freed(lm):
    base = req(3, 20, 30)
    text = alone(lm, base).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop
    for strip in (False, True):
        engine = Engine(lm, EngineOptions(num_slots=2, max_total_tokens=512))
        r = GenerateRequest(base.id, base.prompt_ids, 30, stop=(stop,), strip_stop=strip, ignore_eos=True)
        (out,) = engine.generate([r])
        head = text[: text.index(stop)]
        assert out.text == (head if strip else head + stop)
        assert out.finish_reason == "stop_sequence"
        assert engine.decode.free_slots == 2


def test_stop_token_and_single_token_requests_end_at_prefill(lm):
    first = alone(lm, req(4, 12, 1)).token_ids
    assert len(first) == 1
    engine = Engine(lm, EngineOptions(num_slots=2, max_total_tokens=512))
    stopped = GenerateRequest("s", prompt(12, 4), 10, stop_token_ids=(first[0],), ignore_eos=True)
    (out,) = engine.generate([stopped])
    assert out.token_ids == first and out.finish_reason == "stop_sequence"
    assert not engine.decode.requests and engine.decode.free_slots == 2


def test_stop_token_mid_generation(lm):
    tokens = alone(lm, req(5, 9, 12)).token_ids
    stop_at = tokens[6]
    r = GenerateRequest("s", prompt(9, 5), 12, stop_token_ids=(stop_at,), ignore_eos=True)
    out = alone(lm, r)
    assert out.token_ids == tokens[: tokens.index(stop_at) + 1] and out.finish_reason == "stop_sequence"


def test_cancel_frees_the_slot(lm):
    engine = Engine(lm, EngineOptions(num_slots=2, max_total_tokens=512))
    engine.submit(req(1, 10, 50))
    engine.submit(req(2, 10, 50))
    engine.step()
    engine.step()
    assert engine.decode.free_slots == 0
    assert engine.cancel("r1").finish == Finish.CANCELLED
    assert engine.decode.free_slots == 1
    results = {}
    while engine.busy:
        for ev in engine.step():
            results.setdefault(ev.request_id, []).append(ev.token_id)
    assert "r1" not in results and engine.decode.free_slots == 2


def test_limits_give_clear_errors(lm):
    engine = Engine(lm, EngineOptions(num_slots=1, max_total_tokens=100, max_input_tokens=50))
    with pytest.raises(ValidationError, match="51 tokens; at most 50"):
        engine.submit(req(1, 51, 5))
    with pytest.raises(ValidationError, match="exceeds max_total_tokens 100"):
        engine.submit(req(1, 50, 51))
    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        Engine(lm, EngineOptions(max_total_tokens=4096))


def test_logprobs_and_top_tokens_when_asked(lm, tiny_dir):
    r = req(6, 15, 6, logprobs=True, top_n_tokens=3, prompt_logprobs=True)
    out = alone(lm, r)
    assert len(out.logprobs) == 6 and len(out.top_tokens) == 6
    for lp, top, tok in zip(out.logprobs, out.top_tokens, out.token_ids):
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5  # greedy: the best is the chosen one
        assert top[0][1] >= top[1][1] >= top[2][1]
    with torch.inference_mode():
        ids = torch.tensor([r.prompt_ids + tuple(out.token_ids)])
        ref = torch.log_softmax(hf_model(tiny_dir)(ids).logits[0].float(), -1)
    expected = [ref[i - 1, ids[0, i]].item() for i in range(1, 15)]
    assert out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert out.logprobs == pytest.approx([ref[14 + i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-4)


def profiled_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_details_cost_nothing_when_not_asked(lm):
    engine = Engine(lm, EngineOptions(num_slots=4, max_total_tokens=512))
    for i in range(3):
        engine.submit(req(i, 20, 10))
    ops = profiled_ops(lambda: [engine.step() for _ in range(3)])
    assert "aten::addmm" in ops
    assert not {"aten::log_softmax", "aten::_log_softmax", "aten::sort", "aten::topk"} & ops


def test_decode_step_never_copies_the_cache(lm):
    cfg = lm.cfg
    batch, prompt_len = 8, 1000
    engine = Engine(lm, EngineOptions(num_slots=16, max_total_tokens=1100, prefill_token_budget=batch * prompt_len))
    for i in range(batch):
        engine.submit(req(i, prompt_len, 20))
    engine.step()  # prefill + first decode step
    # One layer's keys for the active rows; a gather or copy of the cache would allocate this much.
    layer_keys = batch * cfg.kv_heads * prompt_len * cfg.head_dim * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.step()
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations, "the profiler recorded no allocations"
    assert max(allocations) < layer_keys


def test_prefill_forks_sample_as_their_own_requests_over_one_kv(lm):
    from dataclasses import replace

    from splitserve.prefill_worker.engine import PrefillEngine

    base = req(0, 40, 8, sampling=SamplingParams(temperature=0.9, seed=1, do_sample=True), prompt_logprobs=True)
    forks = [replace(base, id=f"f{s}", sampling=SamplingParams(temperature=0.9, seed=s, do_sample=True))
             for s in (2, 3)]
    other = req(1, 17, 8)
    engine = PrefillEngine(lm, 512)
    with torch.inference_mode():
        shared = engine.run([base, other], 0, [forks, []])
        staged = engine.staging[:, :, :57].clone()
        alone_runs = [engine.run([r], 100 + 50 * i)[0] for i, r in enumerate((base, *forks, other))]
    assert [r.request.id for r in shared] == ["r0", "f2", "f3", "r1"]
    assert [r.first_token for r in shared] == [r.first_token for r in alone_runs]
    assert [(r.kv_offset, r.kv_len) for r in shared] == [(0, 40), (0, 40), (0, 40), (40, 17)]
    assert torch.equal(staged[:, :, :40], engine.staging[:, :, 100:140])
    assert shared[1].prompt_logprobs == shared[0].prompt_logprobs == alone_runs[0].prompt_logprobs
