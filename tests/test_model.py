"""The model functions match transformers' GPTBigCode on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TEST_THREADS, hf_model, load_cpu
from splitserve.common.attention import decode_mask, sdpa_prefill
from splitserve.common.model import decode_buffers, decode_scratch, decode_step, decode_write_index, prefill, row_offsets
from splitserve.common.model_config import ModelConfigError, model_config_from_dict

CHECKPOINTS = ["tiny_dir", "mha_dir"]
PROMPT = "def quicksort(items):\n\tif len(items) <= 1:\n\t\treturn items  # 🐍 变量\n"


@pytest.fixture(params=CHECKPOINTS)
def checkpoint(request):
    return request.getfixturevalue(request.param)


def random_prompts(vocab: int, lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in lens]


def packed(prompts):
    flat = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    return flat, positions, [len(p) for p in prompts]


@torch.inference_mode()
def test_logits_match_transformers(checkpoint):
    lm, ref = load_cpu(checkpoint), hf_model(checkpoint)
    prompts = random_prompts(lm.cfg.vocab_size, [37, 5, 120, 1])
    flat, pos, lens = packed(prompts)
    every = prefill(lm.weights, flat, pos, lens, sdpa_prefill, logit_index=torch.arange(len(flat)))
    start = 0
    for p in prompts:
        expected = ref(p[None]).logits[0]
        assert (every[start : start + len(p)] - expected).abs().max() <= 1e-4
        start += len(p)


@torch.inference_mode()
def test_packed_batch_equals_each_prompt_alone(checkpoint):
    lm = load_cpu(checkpoint)
    prompts = random_prompts(lm.cfg.vocab_size, [64, 3, 200, 17, 1], seed=1)
    last = prefill(lm.weights, *packed(prompts), sdpa_prefill)
    assert last.shape == (len(prompts), lm.cfg.vocab_size)
    for i, p in enumerate(prompts):
        alone = prefill(lm.weights, *packed([p]), sdpa_prefill)
        assert (last[i] - alone[0]).abs().max() <= 1e-5


@pytest.fixture(params=[TEST_THREADS, 2])
def threads(request):
    """With two, decode runs its small attention on one thread and must hand the second back."""
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(TEST_THREADS)


@torch.inference_mode()
def test_prefill_then_decode_equals_full_forward(checkpoint, threads):
    lm, ref = load_cpu(checkpoint), hf_model(checkpoint)
    cfg = lm.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 30, 2], seed=2)
    flat, pos, lens = packed(prompts)
    staging = torch.zeros(cfg.n_layer, 2, len(flat), cfg.kv_heads, cfg.head_dim)
    logits = prefill(lm.weights, flat, pos, lens, sdpa_prefill, kv_out=staging)
    pool = torch.zeros(cfg.n_layer, 2, 4, cfg.kv_heads, 64, cfg.head_dim)
    scratch = decode_scratch(cfg, pool)
    start = 0
    for slot, n in enumerate(lens):  # slot 3 stays free: a masked row inside the prefix
        pool[:, :, slot, :, :n] = staging[:, :, start : start + n].transpose(2, 3)
        start += n
    seqs = [p.tolist() for p in prompts]
    tokens = logits.argmax(-1)
    for _ in range(8):
        for s, t in zip(seqs, tokens.tolist()):
            s.append(t)
        positions = torch.tensor([len(s) - 1 for s in seqs] + [0])
        key_len = (int(positions.max()) + 1 + 7) // 8 * 8
        index = [decode_write_index(row_offsets(4, cfg.kv_heads, 64, 'cpu'), positions, cfg.kv_heads)] * cfg.n_layer
        step = decode_step(lm.weights, torch.cat([tokens, torch.zeros(1, dtype=torch.long)]), positions,
                           decode_buffers(cfg, pool, scratch, 4, key_len), index,
                           [decode_mask(positions, key_len, cfg.kv_heads, torch.float32)] * cfg.n_layer)
        assert torch.get_num_threads() == threads
        for s, row in zip(seqs, step):
            assert (row - ref(torch.tensor([s])).logits[0, -1]).abs().max() <= 1e-4
        tokens = step[:3].argmax(-1)
    # a step that fails inside its attention still hands the threads back
    bad_mask = torch.zeros(4 * cfg.kv_heads, 1, key_len + 1)
    with pytest.raises(RuntimeError):
        decode_step(lm.weights, tokens.new_zeros(4), positions, decode_buffers(cfg, pool, scratch, 4, key_len), index,
                    [bad_mask] * cfg.n_layer)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_half_precision_close_to_fp32(tiny_dir, dtype):
    ref, half = load_cpu(tiny_dir), load_cpu(tiny_dir, dtype)
    prompts = random_prompts(ref.cfg.vocab_size, [50, 7], seed=3)
    a = prefill(ref.weights, *packed(prompts), sdpa_prefill)
    b = prefill(half.weights, *packed(prompts), sdpa_prefill)
    assert b.dtype == dtype
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()


def test_other_architectures_are_refused():
    from splitserve.common.families import FAMILIES

    runs = ", ".join(FAMILIES)
    with pytest.raises(ModelConfigError, match=f"unsupported model_type 'qwen3_next': splitserve runs {runs} "):
        model_config_from_dict({"model_type": "qwen3_next", "hidden_size": 8})


def run_cli(*args: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_greedy_generate_matches_transformers(checkpoint):
    ref = hf_model(checkpoint)
    from splitserve.common.tokenizer import Tokenizer

    prompt_ids = Tokenizer.from_dir(checkpoint).encode(PROMPT)
    with torch.inference_mode():
        expected = ref.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                max_new_tokens=64, do_sample=False, eos_token_id=0, pad_token_id=0)
    expected = expected[0, len(prompt_ids):].tolist()
    got = json.loads(run_cli("generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "64",
                             "--threads", str(TEST_THREADS), "--json"))
    assert got["token_ids"] == expected
    assert len(got["token_ids"]) == 64 or got["token_ids"][-1] == 0
