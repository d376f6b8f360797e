"""Batched sampling: transformers-equivalent filters and penalties, Gumbel-max, batch invariance."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from splitserve.common.params import SamplingParams, derive_seed, random_seed
from splitserve.common.sampling import (
    SamplingTensors,
    init_token_counts,
    process_logits,
    sample,
    slide_token_counts,
    update_token_counts,
)

torch.set_num_threads(1)

V = 64


def st_of(*params: SamplingParams) -> SamplingTensors:
    return SamplingTensors.build(list(params), "cpu")


def repeated(params: SamplingParams, n: int) -> SamplingTensors:
    return st_of(*[params] * n)


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n tokens for one request at positions 0..n-1 (a batch of n copies; batch invariance makes
    that the same as n separate steps with the same logits)."""
    logits = logits_row.expand(n, -1)
    return sample(logits, repeated(params, n), torch.arange(n)).tokens


def hf_mask(warper, logits: torch.Tensor) -> torch.Tensor:
    return torch.isinf(warper(None, logits.clone()))


def test_greedy_is_argmax_without_float_work():
    logits = torch.randn(5, V).bfloat16()
    out = sample(logits, repeated(SamplingParams(), 5), torch.arange(5))
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None
    # temperature 0 with do_sample is greedy too
    st = repeated(SamplingParams(do_sample=True, temperature=0.0, top_k=3), 5)
    assert st.all_greedy and not st.any_top_k
    assert torch.equal(sample(logits, st, torch.arange(5)).tokens, logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(V)  # uniform: tokens are pure noise
    a = draws(logits, SamplingParams(do_sample=True, seed=7), 50)
    assert torch.equal(a, draws(logits, SamplingParams(do_sample=True, seed=7), 50))
    b = draws(logits, SamplingParams(do_sample=True, seed=8), 50)
    assert (a != b).sum() > 40
    high = draws(logits, SamplingParams(do_sample=True, seed=7 + (1 << 40)), 50)
    assert (a != high).sum() > 40  # the seed's high half matters too
    assert len(set(a.tolist())) > 20  # positions change the noise


OTHER_PARAMS = [
    SamplingParams(),
    SamplingParams(do_sample=True, temperature=1.3, seed=3),
    SamplingParams(do_sample=True, top_k=2, seed=4, repetition_penalty=1.5),
    SamplingParams(do_sample=True, typical_p=0.5, seed=5),
    SamplingParams(do_sample=True, top_p=0.3, top_k=40, seed=6, frequency_penalty=0.7),
    SamplingParams(do_sample=True, min_p=0.2, seed=7, presence_penalty=0.5),
    SamplingParams(repetition_penalty=2.0),
]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=123),
        SamplingParams(do_sample=True, seed=(1 << 63) - 1),
        SamplingParams(do_sample=True, typical_p=0.9, repetition_penalty=1.2, seed=9),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(do_sample=True, temperature=1.2, min_p=0.1, presence_penalty=0.8, seed=10),
    ],
)
def test_row_result_does_not_depend_on_the_batch(params):
    steps = 50
    row_logits = torch.randn(steps, V, generator=torch.Generator().manual_seed(0)) * 3
    row_counts = torch.randint(0, 3, (V,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    for batch, slot in ((1, 0), (3, 1), (16, 13)):
        rows = [OTHER_PARAMS[i % len(OTHER_PARAMS)] for i in range(batch)]
        rows[slot] = params
        st = st_of(*rows)
        counts = torch.randint(0, 3, (batch, V), dtype=torch.int32)
        counts[slot] = row_counts
        tokens, logprobs = [], []
        for step in range(steps):
            logits = torch.randn(batch, V) * 3
            logits[slot] = row_logits[step]
            positions = torch.randint(0, 1000, (batch,))
            positions[slot] = 100 + step
            out = sample(logits, st, positions, counts, want_logprobs=True, top_n=3)
            tokens.append(out.tokens[slot])
            logprobs.append(out.logprobs[slot])
        result = torch.stack(tokens), torch.stack(logprobs)
        if batch == 1:
            expected = result
        else:
            assert torch.equal(result[0], expected[0]), batch
            assert torch.equal(result[1], expected[1]), batch


def test_gumbel_max_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, -3.0, 0.3])
    n = 20000
    tokens = draws(logits, SamplingParams(do_sample=True, seed=11), n)
    freq = torch.bincount(tokens, minlength=8).float() / n
    assert (freq - logits.softmax(-1)).abs().max() < 0.02


def test_lower_temperature_concentrates():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2, -3.0, 0.3])
    n = 4000

    def top_share(temperature):
        params = SamplingParams(do_sample=True, temperature=temperature, seed=1)
        return (draws(logits, params, n) == 0).float().mean()

    cold, warm, hot = top_share(0.3), top_share(1.0), top_share(3.0)
    assert cold > warm + 0.2 and warm > hot + 0.05
    expected = (logits / 0.3).softmax(-1)[0]
    assert abs(cold - expected) < 0.03


def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    tokens = draws(logits, SamplingParams(do_sample=True, top_k=5, seed=2), 3000)
    assert set(tokens.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_p_hits_only_the_nucleus_with_renormalized_frequencies():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4)) * 2
    params = SamplingParams(do_sample=True, top_p=0.7, seed=5)
    n = 20000
    tokens = draws(logits, params, n)
    nucleus = ~hf_mask(TopPLogitsWarper(0.7), logits[None])[0]
    freq = torch.bincount(tokens, minlength=V).float() / n
    assert freq[~nucleus].sum() == 0
    expected = logits.masked_fill(~nucleus, float("-inf")).softmax(-1)
    assert (freq - expected).abs().max() < 0.02


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_mask_matches_transformers(top_p):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(5)) * 2
    mine = process_logits(logits, repeated(SamplingParams(do_sample=True, top_p=top_p), 8))
    assert torch.equal(torch.isinf(mine), hf_mask(TopPLogitsWarper(top_p), logits))


@pytest.mark.parametrize("top_k", [1, 7, 499, 500, 900])
def test_top_k_mask_matches_transformers(top_k):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(6))
    mine = process_logits(logits, repeated(SamplingParams(do_sample=True, top_k=top_k), 8))
    assert torch.equal(torch.isinf(mine), hf_mask(TopKLogitsWarper(top_k), logits))


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    mine = process_logits(logits, st_of(SamplingParams(do_sample=True, top_k=2)))
    assert torch.equal(torch.isinf(mine), hf_mask(TopKLogitsWarper(2), logits))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_mask_matches_transformers(mass):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(7)) * 2
    mine = process_logits(logits, repeated(SamplingParams(do_sample=True, typical_p=mass), 8))
    assert torch.equal(torch.isinf(mine), hf_mask(TypicalLogitsWarper(mass), logits))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_mask_matches_transformers(min_p):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(13)) * 3
    mine = process_logits(logits, repeated(SamplingParams(do_sample=True, min_p=min_p), 8))
    assert torch.equal(torch.isinf(mine), hf_mask(MinPLogitsWarper(min_p), logits))


def test_filters_chain_in_transformers_order():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(8)) * 2
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.8, min_p=0.05, typical_p=0.9)
    expected = logits / 0.7
    for warper in (TopKLogitsWarper(50), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05), TypicalLogitsWarper(0.9)):
        expected = warper(None, expected)
    mine = process_logits(logits, repeated(params, 4))
    assert torch.equal(torch.isinf(mine), torch.isinf(expected))
    finite = ~torch.isinf(mine)
    assert torch.equal(mine[finite], expected[finite])


def test_filters_off_rows_are_untouched_in_a_filtering_batch():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(9))
    st = st_of(SamplingParams(do_sample=True, top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5),
               SamplingParams(do_sample=True))
    assert torch.equal(process_logits(logits, st)[1], logits[1])


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(3, V, generator=gen) * 4
    input_ids = torch.randint(0, V, (3, 20), generator=gen)
    counts = torch.stack([init_token_counts(row.tolist(), 20, True, V, "cpu") for row in input_ids])
    for params in (SamplingParams(repetition_penalty=1.7), SamplingParams(do_sample=True, repetition_penalty=0.6)):
        expected = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, logits.clone())
        assert torch.equal(process_logits(logits, repeated(params, 3), counts), expected)


def test_frequency_penalty_scales_with_count():
    logits = torch.zeros(1, 6)
    counts = torch.tensor([[0, 1, 2, 3, 0, 5]], dtype=torch.int32)
    params = SamplingParams(do_sample=True, frequency_penalty=0.5)
    mine = process_logits(logits, st_of(params), counts)
    assert torch.equal(mine, -0.5 * counts.float())
    probs = mine.softmax(-1)[0]
    assert probs[0] == probs[4] and probs[0] > probs[1] > probs[2] > probs[3] > probs[5]
    with pytest.raises(ValueError):
        process_logits(logits, st_of(params))


def test_presence_penalty_counts_each_seen_token_once_beside_frequency():
    logits = torch.zeros(1, 6)
    counts = torch.tensor([[0, 1, 2, 3, 0, 5]], dtype=torch.int32)
    mine = process_logits(logits, st_of(SamplingParams(do_sample=True, presence_penalty=0.4)), counts)
    assert torch.equal(mine, -0.4 * (counts > 0).float())
    both = SamplingParams(do_sample=True, frequency_penalty=0.5, presence_penalty=-0.3)  # OpenAI's [-2, 2]
    mine = process_logits(logits, st_of(both), counts)
    assert torch.equal(mine, -0.5 * counts.float() + 0.3 * (counts > 0).float())


def test_penalties_apply_to_greedy_rows():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    counts = torch.tensor([[1, 0, 0]], dtype=torch.int32)
    out = sample(logits, st_of(SamplingParams(repetition_penalty=1.2)), torch.zeros(1, dtype=torch.int64), counts)
    assert out.tokens.tolist() == [1]


def test_logprobs_are_those_of_the_processed_logits():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(12))
    st = st_of(
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.5, seed=1),
        SamplingParams(do_sample=True, top_k=3, seed=2),
        SamplingParams(do_sample=True, top_p=0.5, seed=3),
    )
    positions = torch.arange(4)
    plain = sample(logits, st, positions)
    assert plain.logprobs is None and plain.top_ids is None and plain.top_logprobs is None
    out = sample(logits, st, positions, want_logprobs=True, top_n=5)
    assert torch.equal(out.tokens, plain.tokens)
    expected = process_logits(logits, st).log_softmax(-1)
    assert torch.equal(out.logprobs, expected.gather(1, out.tokens[:, None])[:, 0])
    assert torch.equal(out.top_logprobs, expected.topk(5).values)
    assert torch.equal(expected.gather(1, out.top_ids), out.top_logprobs)
    assert torch.equal(out.top_ids[0], logits[0].topk(5).indices)
    assert (out.top_logprobs[2, 3:] == float("-inf")).all()  # only 3 tokens survive top_k=3
    only_logprobs = sample(logits, st, positions, want_logprobs=True)
    assert only_logprobs.logprobs is not None and only_logprobs.top_ids is None
    with pytest.raises(ValueError):
        sample(logits, st, positions, top_n=6)


def ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_greedy_fast_path_does_no_extra_work():
    logits = torch.randn(4, V)
    ops = ops_run(lambda: sample(logits, repeated(SamplingParams(), 4), torch.arange(4)))
    assert "aten::argmax" in ops
    for op in ("aten::_log_softmax", "aten::log_softmax", "aten::sort", "aten::topk", "aten::log", "aten::_to_copy"):
        assert op not in ops


def test_sampling_without_details_skips_log_softmax():
    logits = torch.randn(4, V)
    st = repeated(SamplingParams(do_sample=True, top_k=50, top_p=0.9), 4)
    ops = ops_run(lambda: sample(logits, st, torch.arange(4)))
    assert "aten::sort" in ops and "aten::topk" in ops
    assert "aten::_log_softmax" not in ops and "aten::log_softmax" not in ops
    ops = ops_run(lambda: sample(logits, repeated(SamplingParams(do_sample=True), 4), torch.arange(4)))
    assert "aten::sort" not in ops and "aten::topk" not in ops


def test_set_row_and_view_share_storage_and_refresh_flags():
    pool = SamplingTensors.empty(8, "cpu")
    assert pool.all_greedy and not (pool.any_top_k or pool.any_top_p or pool.any_typical or pool.any_penalty)
    pool.set_row(5, SamplingParams(do_sample=True, top_k=40, seed=99))
    pool.set_row(1, {"do_sample": True, "top_p": 0.5, "frequency_penalty": 0.1})
    assert not pool.all_greedy and pool.any_top_k and pool.max_top_k == 40 and pool.any_top_p and pool.any_penalty
    head = pool.view(3)
    assert head.temperature.data_ptr() == pool.temperature.data_ptr() and head.seed.shape == (3,)
    assert not head.any_top_k and head.max_top_k == 0 and head.any_top_p and not head.all_greedy
    assert pool.seed[5] == 99 and pool.greedy.tolist() == [True, False, True, True, True, False, True, True]
    pool.set_row(1, SamplingParams())
    assert pool.view(3).all_greedy and not pool.view(3).any_penalty
    assert pool.top_p[1] == 1.0


def test_pool_rows_sample_like_freshly_built_ones():
    rows = [SamplingParams(do_sample=True, seed=s, top_k=9, top_p=0.8) for s in (5, 1 << 50, 77)]
    pool = SamplingTensors.empty(6, "cpu")
    for i, params in enumerate(rows):
        pool.set_row(i, params)
    logits = torch.randn(3, V)
    positions = torch.tensor([3, 40, 500], dtype=torch.int32)
    expected = sample(logits, st_of(*rows), positions.long()).tokens
    assert torch.equal(sample(logits, pool.view(3), positions).tokens, expected)


def test_seed_keys_made_on_the_host_are_the_tensor_hash_of_the_seed():
    # The key as it was made on the device before, by the hash that turns it into noise every step
    from splitserve.common.sampling import _M32, _SEED_SALT, _mix32_, _seed_key

    seeds = [0, 1, 5, 77, (1 << 32) - 1, 1 << 32, 1 << 50, (1 << 63) - 1, -1, -(1 << 63), random_seed(), derive_seed(9, 2)]
    seeds += torch.randint(-(1 << 63), (1 << 63) - 1, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    t = torch.tensor(seeds, dtype=torch.int64)
    on_device = _mix32_(_mix32_((t & _M32) ^ _SEED_SALT) ^ torch.bitwise_right_shift(t, 32))
    assert [_seed_key(s) for s in seeds] == on_device.tolist()
    pool = SamplingTensors.empty(2, "cpu")
    pool.set_row(1, SamplingParams(do_sample=True, seed=1 << 50))
    assert pool.seed_key.tolist() == [_seed_key(0), _seed_key(1 << 50)] == st_of(SamplingParams(), SamplingParams(
        do_sample=True, seed=1 << 50)).seed_key.tolist()


def test_build_accepts_objects_and_validates():
    class Req:
        temperature = 0.5
        do_sample = True
        seed = 3

    st = SamplingTensors.build([Req()], "cpu")
    assert st.temperature.tolist() == [0.5] and st.seed.tolist() == [3] and not st.all_greedy
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(seed=1 << 63), dict(top_k=-1), dict(min_p=-0.1),
                dict(min_p=1.5), dict(logit_bias=((1, 100.5),)), dict(logit_bias=((1, float("nan")),)),
                dict(logit_bias=((1, 1.0), (1, 2.0))), dict(logit_bias=((-1, 1.0),)),
                dict(logit_bias=tuple((t, 1.0) for t in range(1025))), dict(penalty_last_n=-1),
                dict(penalty_last_n=8, penalize_prompt=False)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_token_counts_helpers():
    counts = torch.stack([init_token_counts([1, 1, 3], 3, True, 5, "cpu"), init_token_counts([], 0, True, 5, "cpu")])
    assert counts.dtype == torch.int32 and counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0]]
    update_token_counts(counts, torch.tensor([3, 4]))
    assert counts.tolist() == [[0, 2, 0, 2, 0], [0, 0, 0, 0, 1]]


def test_a_window_of_counts_slides_with_each_token():
    """penalty_last_n: counts of the last n tokens, kept as each new one is counted (slide_token_counts
    and update_token_counts), equal counts made afresh from the last n; a row without a window keeps
    counting every token beside it."""
    gen = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 6, (2, 40), generator=gen).tolist()  # few distinct tokens: many repeats
    n, start = 5, 9
    counts = torch.stack([init_token_counts(ids[0][:start], start, True, 6, "cpu", n),
                          init_token_counts(ids[1][:start], start, True, 6, "cpu")])
    recent = torch.zeros(2, 8, dtype=torch.int32)
    for q in range(start - n, start):
        recent[0, q % n] = ids[0][q]
    windows = torch.tensor([n, 0])
    for p in range(start, 40):
        new = torch.tensor([ids[0][p], ids[1][p]])
        slide_token_counts(counts, recent, windows, new, torch.tensor([p, p]))
        update_token_counts(counts, new)
        assert counts[0].tolist() == init_token_counts(ids[0][: p + 1], 0, True, 6, "cpu", n).tolist()
        assert counts[1].tolist() == init_token_counts(ids[1][: p + 1], 0, True, 6, "cpu").tolist()


def test_answer_only_penalties_are_vllms_and_survive_a_resume():
    """penalize_prompt=False (OpenAI's): frequency and presence count the answer's tokens only, the
    repetition penalty every token seen, as vLLM applies them (written out here from its formula).
    A resumed request, whose prompt ends with answer tokens, counts as the undisturbed one."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(1, V, generator=gen) * 4
    prompt, answer = torch.randint(0, V, (30,), generator=gen), torch.randint(0, V, (12,), generator=gen)
    params = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.7,
                            penalize_prompt=False)
    out_counts = torch.bincount(answer, minlength=V)[None]  # [1, V]
    seen = (torch.bincount(prompt, minlength=V)[None] > 0) | (out_counts > 0)
    rep = torch.where(logits > 0, logits / 1.4, logits * 1.4)
    expected = torch.where(seen, rep, logits) - 0.5 * out_counts - 0.7 * (out_counts > 0)
    ids = prompt.tolist() + answer.tolist()
    undisturbed = init_token_counts(ids[:31], 30, False, V, "cpu")[None]
    for t in answer[1:]:
        update_token_counts(undisturbed, t[None])
    resumed = init_token_counts(ids, 30, False, V, "cpu")[None]  # resumed: its last 12 prompt ids are answer
    assert torch.equal(undisturbed, resumed)
    assert torch.allclose(process_logits(logits, st_of(params), resumed), expected, atol=1e-6)
    # counting the prompt too (TGI's and the default) differs where a prompt token is not in the answer
    counted = init_token_counts(ids, len(ids), True, V, "cpu")[None]
    assert not torch.allclose(process_logits(logits, st_of(params), counted), expected)


def test_logit_bias_matches_transformers_per_row():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(3, V, generator=gen)
    biases = [((5, 3.5), (9, -100.0), (60, 0.25)), (), ((5, float("-inf")),)]
    st = st_of(*[SamplingParams(logit_bias=b) for b in biases])
    assert st.any_bias and not st.plain and st.bias_ids.shape == (3, 4)  # padded to a power of two
    mine = process_logits(logits, st)
    assert torch.equal(mine[1], logits[1])
    for row in (0, 2):
        hf = SequenceBiasLogitsProcessor({(t,): v for t, v in biases[row]})
        assert torch.equal(mine[row : row + 1], hf(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone()))
    assert sample(logits, st, torch.arange(3)).tokens.tolist()[0] == 5  # +3.5 over unit-normal logits
    assert sample(logits, st, torch.arange(3)).tokens.tolist()[2] != 5


def test_a_pool_widens_its_bias_table_and_clears_a_freed_row():
    pool = SamplingTensors.empty(4, "cpu")
    assert pool.bias_ids.shape == (4, 0) and pool.plain
    pool.set_row(1, SamplingParams(logit_bias=((7, 2.0),)))
    pool.set_row(3, SamplingParams(logit_bias=tuple((t, 1.0) for t in range(10, 15))))
    assert pool.bias_ids.shape == (4, 8) and pool.bias_ids[1].tolist() == [7] + [0] * 7
    assert not pool.view(1).any_bias and pool.view(2).any_bias
    logits = torch.zeros(4, V)
    assert sample(logits, pool.view(4), torch.arange(4)).tokens.tolist() == [0, 7, 0, 10]
    pool.set_row(1, SamplingParams())
    assert not pool.view(2).any_bias and pool.bias_values[1].abs().sum() == 0


def test_derive_seed_is_deterministic_distinct_and_63_bit():
    seeds = [derive_seed(42, i) for i in range(1000)]
    assert seeds == [derive_seed(42, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and 42 not in seeds
    assert all(0 <= s < 1 << 63 for s in seeds)
    assert not set(seeds) & {derive_seed(43, i) for i in range(1000)}
    assert 0 <= random_seed() < 1 << 63 and random_seed() != random_seed()
