"""Every model family against transformers on random fp32 checkpoints that transformers itself makes:
logits within 1e-4, greedy tokens equal (a divergence only where the reference's top two logits
are within 1e-4), prefill + decode equal to a full forward, packed prompts equal to each alone,
a resumed request continuing exactly; GQA, sliding windows shorter than the prompt, rotary
scalings, tied and untied heads, q/k/v biases and q/k norms among the variants."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster import Cluster, offline, request_specs, stream_all
from conftest import TEST_THREADS
from quantize_support import DYNAMIC, awq_quantize, compressed_tensors_quantize, fp8_quantize, gptq_quantize
from splitserve.client import Client
from splitserve.common.attention import sdpa_prefill
from splitserve.common import fp8
from splitserve.common.checkpoint import CheckpointError
from splitserve.common.loading import load_model
from splitserve.common.model import prefill
from splitserve.common.model_config import WeightQuant, ModelConfigError, load_model_config, model_config_from_dict
from splitserve.common.params import SamplingParams
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import write_tokenizer_files
from splitserve.engine import Engine, EngineOptions
from splitserve.prefill_worker.engine import PrefillEngine

torch.set_num_threads(TEST_THREADS)

VOCAB = 8192  # the tiny tokenizer's, written beside each checkpoint
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
WINDOW = 24  # shorter than the long prompts below
# DeepSeek-V2's latent attention and experts, at SHAPE's size (its configs name as many K/V heads as
# query heads, and transformers' reference takes no other number)
LATENT = dict(num_key_value_heads=8, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1)

# the multimodal checkpoints' vision towers (SigLIP, Pixtral), as small as their shapes allow
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)
MULTIMODAL = {"gemma3": dict(vision_config=TINY_VISION | dict(model_type="siglip_vision_model"), mm_tokens_per_image=4),
              "mistral3": dict(vision_config=TINY_VISION | dict(model_type="pixtral", head_dim=16))}
GEMMA3 = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.5}
# LongRoPE's per-frequency factors for SHAPE's heads of 8 (4 frequencies), within and past 128 positions
LONGROPE_ORIGINAL = 128
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.2, 1.9, 3.1],
            "long_factor": [1.1, 2.5, 6.0, 17.0]}

# name -> (model_type, config fields beyond SHAPE)
VARIANTS = {
    "llama": ("llama", {}),
    "llama-bias-tied-linear": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 500.0})),
    "llama-mha-llama3": ("llama", dict(num_key_value_heads=8, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 10000.0})),
    "llama-mqa-yarn": ("llama", dict(num_key_value_heads=1, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "llama-dynamic": ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral-window-head-dim": ("mistral", dict(sliding_window=WINDOW, head_dim=16)),
    # Meta's CWM: windows on layers 1 and 2 of 3 (its default pattern), Llama 3's scaling by default
    "cwm-windows": ("cwm", dict(head_dim=16, sliding_window=WINDOW)),
    # IQuest-Coder: a Llama with its own defaults
    "iquestcoder": ("iquestcoder", dict(head_dim=16)),
    "qwen2-bias-tied-window": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True,
                                             sliding_window=WINDOW, max_window_layers=1)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32)),
    "qwen3-bias-window": ("qwen3", dict(head_dim=16, attention_bias=True, use_sliding_window=True,
                                        sliding_window=WINDOW, max_window_layers=0)),
    "starcoder2-window": ("starcoder2", dict(sliding_window=WINDOW, norm_epsilon=1e-5)),
    # Granite 3.x's multipliers (8B's values), a tied head, biases
    "granite-multipliers": ("granite", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                            attention_multiplier=0.0078125 * 8, logits_scaling=16.0,
                                            tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    # Stable Code 3B's layout: LayerNorms, rotary embeddings on the first quarter of each head (4 of
    # 16 values, transformers' default share); q/k/v biases as StableLM 2 1.6B has them
    "stablelm-partial-bias": ("stablelm", dict(num_attention_heads=4, use_qkv_bias=True)),
    # phi-1/phi-2: parallel residual branches, biases everywhere (the LM head's too), phi-2's 0.4 of
    # each head turned (4 of 10 values), multi-head
    "phi-parallel": ("phi", dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=40,
                                 partial_rotary_factor=0.4)),
    # Phi-3's fused q/k/v and gate/up projections, Phi-3-mini-4k's window (2,047: its ring is one longer),
    # Phi-4-mini's partial rotary
    "phi3-window-partial": ("phi3", dict(sliding_window=WINDOW - 1, partial_rotary_factor=0.5, pad_token_id=0)),
    # Phi-3.5-mini's LongRoPE (its pretraining length 128 here: every test prompt fits within it;
    # test_longrope_goes_past_its_pretraining_length_as_transformers_does goes past), a tied head
    "phi3-longrope-tied": ("phi3", dict(tie_word_embeddings=True, original_max_position_embeddings=LONGROPE_ORIGINAL,
                                        rope_parameters=LONGROPE, pad_token_id=0)),
    # Seed-OSS: q/k/v biases by default, the output projection's and the MLP's on too
    "seedoss-biases": ("seed_oss", dict(head_dim=16, attention_out_bias=True, mlp_bias=True)),
    # GLM-4-0414: sandwich norms, interleaved rotary pairs on half of each head, fused gate/up, q/k/v biases
    "glm4-sandwich": ("glm4", dict(head_dim=16, pad_token_id=0)),
    # GLM-4-9B (hf): the same without sandwich norms, multi-query, a tied head
    "glm-mqa-tied": ("glm", dict(head_dim=16, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0)),
    "gemma-mqa": ("gemma", dict(head_dim=16, num_key_value_heads=1)),
    "gemma-gqa-untied": ("gemma", dict(head_dim=32, tie_word_embeddings=False)),
    # Gemma 2: sandwich norms, capped scores and logits (caps low enough to bite here), its own softmax
    # scale, a window on every other layer
    "gemma2-softcap-window": ("gemma2", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                             attn_logit_softcapping=10.0, final_logit_softcapping=15.0)),
    # Gemma 3: q/k norms, the windowed layers' own rotary base, the full layer's scaled (linear x8)
    "gemma3text-local-rope": ("gemma3_text", GEMMA3),
    # the text model of a multimodal Gemma 3 checkpoint (a vision tower beside it), its head untied
    "gemma3-multimodal-untied": ("gemma3", GEMMA3 | dict(tie_word_embeddings=False)),
    # Ministral 3: YaRN and Llama 4's attention temperature, which the prompts here reach (from 32 on)
    "ministral3-temperature": ("ministral3", dict(head_dim=16, rope_parameters=MINISTRAL3_ROPE)),
    # its multimodal checkpoint (Ministral 3, Devstral Small 2), a window
    "mistral3-multimodal-ministral": ("mistral3", dict(model_type="ministral3", head_dim=16, sliding_window=WINDOW,
                                                      rope_parameters=MINISTRAL3_ROPE)),
    "mixtral-window": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "qwen3moe-norm-top": ("qwen3_moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                            moe_intermediate_size=32, norm_topk_prob=True)),
    # layer 1 has experts; 0 and 2 dense MLPs (off the sparse step), 3 too (named dense); a window
    "qwen3moe-dense-layers-window": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=48,
                                                       num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3],
                                                       use_sliding_window=True, sliding_window=WINDOW)),
    # Mellum: Qwen3-MoE's layers, a dense MLP in layer 0, windows with their own rotary base in 0 and 2
    "mellum-windows-dense": ("mellum", dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                            sliding_window=WINDOW, mlp_layer_types=["dense", "sparse", "sparse"],
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                            rope_parameters={"full_attention": {"rope_type": "default",
                                                                                "rope_theta": 5e5},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 1e4}})),
    # gpt-oss: attention sinks, windows on every other layer, biased experts with a clamp low enough to
    # bite, YaRN reached by the long prompts
    "gptoss-sinks-clamp": ("gpt_oss", dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                           sliding_window=WINDOW, swiglu_limit=1.5, rope_parameters={
                                               "rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4,
                                               "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "truncate": False})),
    # latent attention as DeepSeek-Coder-V2-Lite has it: queries uncompressed, YaRN with mscale on
    # the softmax too, a dense first layer, shared experts
    "deepseekv2-lite-yarn": ("deepseek_v2", dict(**LATENT, q_lora_rank=None, first_k_dense_replace=1, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0})),
    # DeepSeek-V3's routing: sigmoid scores, a choice bias, groups by their best two (noaux_tc)
    "deepseekv3-noaux": ("deepseek_v3", LATENT | dict(q_lora_rank=24, first_k_dense_replace=1, n_group=4, topk_group=2,
                                                      routed_scaling_factor=2.5)),
    # GLM-4.5: grouped-query attention with biases, q/k norms and rotary on half of each head, V3's
    # routing in groups with a shared expert, the first layer dense
    "glm4moe-qk-norm-groups": ("glm4_moe", dict(head_dim=16, attention_bias=True, use_qk_norm=True, n_routed_experts=8,
                                                num_experts_per_tok=2, moe_intermediate_size=32, n_group=4,
                                                topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1)),
    # GLM-4.7-Flash: V3's routing in one group, rotary pairs in halves (rope_interleave off)
    "glm4moelite-halves": ("glm4_moe_lite", LATENT | dict(q_lora_rank=24, rope_interleave=False,
                                                          mlp_layer_types=["dense", "sparse", "sparse"])),
    # compressed queries (DeepSeek-Coder-V2), group-limited routing, scaled routed weights
    "deepseekv2-q-rank-groups": ("deepseek_v2", {**LATENT, **dict(q_lora_rank=24, topk_method="group_limited_greedy",
                                                                  n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                                                  n_shared_experts=2)}),
}


def make_checkpoint(path: Path, model_type: str, fields: dict) -> Path:
    """A random checkpoint as transformers writes it, weights scaled up so that greedy paths are not flat."""
    from transformers import AutoConfig

    torch.manual_seed(sum(map(ord, path.name)))
    if model_type in MULTIMODAL:  # the text model's fields in text_config, a tiny vision tower
        config = AutoConfig.for_model(model_type, text_config={**SHAPE, **fields}, **MULTIMODAL[model_type],
                                      tie_word_embeddings=fields.get("tie_word_embeddings", True))
    else:
        config = AutoConfig.for_model(model_type, **{**SHAPE, **fields})
    model = auto_model(model_type).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("_bias"):
                p.mul_(4)
            else:  # norms and biases (gpt-oss's experts' are 2-D) off their initial values, so that each one matters
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():  # DeepSeek-V3's routing bias starts at zero
            if name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
    model.save_pretrained(path)
    write_tokenizer_files(path)
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory) -> Path:
    model_type, fields = VARIANTS[request.param]
    return make_checkpoint(tmp_path_factory.mktemp(request.param), model_type, fields)


def reference(path: Path):
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    return auto_model(model_type).from_pretrained(path, dtype=torch.float32).eval()


def auto_model(model_type: str):
    """transformers' auto class for the family: Mistral 3 is an image-text-to-text model only."""
    import transformers

    return transformers.AutoModelForImageTextToText if model_type == "mistral3" else transformers.AutoModelForCausalLM


def prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lens]


def packed(batch: list[list[int]]):
    flat = torch.tensor([t for p in batch for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in batch])
    return flat, positions, [len(p) for p in batch]


def assert_greedy(ours: list[int], prompt: list[int], ref) -> None:
    """Our greedy continuation is the reference's: at each step our token is its argmax, or one of
    two candidates whose logits it has within 1e-4 of each other (a near-tie either may break)."""
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1 : -1]  # [N, V]
    top2 = logits.topk(2, dim=-1)
    for i, token in enumerate(ours):
        best, second = top2.values[i].tolist()
        if token != top2.indices[i, 0]:
            assert best - second < 1e-4 and token == top2.indices[i, 1], f"step {i}: {token} vs {top2.indices[i, 0]}"


@torch.inference_mode()
def test_logits_match_transformers(checkpoint):
    model, ref = load_model(checkpoint, torch.float32, torch.device("cpu")), reference(checkpoint)
    for prompt in prompts([60, 5]):  # 60 tokens: longer than the sliding windows
        ours = prefill(model.weights, *packed([prompt]), sdpa_prefill, logit_index=torch.arange(len(prompt)))
        theirs = ref(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@torch.inference_mode()
def test_packed_batch_equals_each_prompt_alone(checkpoint):
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    batch = prompts([40, 3, 70, 17], seed=1)
    together = prefill(model.weights, *packed(batch), sdpa_prefill)  # [4, V]
    for row, prompt in zip(together, batch):
        torch.testing.assert_close(row, prefill(model.weights, *packed([prompt]), sdpa_prefill)[0], rtol=0, atol=1e-5)


@torch.inference_mode()
def test_a_prefill_after_a_cached_prefix_equals_the_whole_prompts(checkpoint):
    """A prompt whose first tokens' K/V are already staged (a prefix cache hit) computes only the
    rest: rotary positions continue from the prefix, windows reach back into it, and its logits and
    K/V are the whole prompt's. Packed with a prompt that has no cached prefix."""
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    cfg = model.cfg
    a, b = prompts([70, 30], seed=4)

    def staging(n: int) -> torch.Tensor:
        return torch.zeros(cfg.n_layer, 2, n, cfg.kv_heads, cfg.head_dim)

    whole = staging(100)
    want = prefill(model.weights, *packed([a, b]), sdpa_prefill, kv_out=whole)
    cached = 48  # of a's 70 tokens; b has none
    kv = staging(100)
    kv[:, :, :cached] = whole[:, :, :cached]
    ids = torch.tensor(a[cached:] + b)
    positions = torch.cat([torch.arange(cached, len(a)), torch.arange(len(b))])
    got = prefill(model.weights, ids, positions, [len(a) - cached, len(b)], sdpa_prefill, kv_out=kv, past=[cached, 0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(kv, whole, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_a_prompt_prefilled_in_pieces_equals_it_whole(checkpoint):
    """A long prompt prefilled over several passes (the prefill worker's --prefill-chunk-tokens),
    in a staging region not at the buffer's start: each piece's rotary positions and windows go on
    from the pieces before it, and its K/V, first token and that token's log-probabilities are
    those of the prompt prefilled whole."""
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    request = GenerateRequest("r", tuple(prompts([90], seed=5)[0]), 4, logprobs=True, top_n_tokens=3)
    whole, pieces = PrefillEngine(model, 256), PrefillEngine(model, 256)
    want = whole.run([request])[0]
    offset, bounds = 7, [0, 13, 40, 71]  # pieces of 13, 27 and 31 tokens (longer than the windows), then 19
    for past, upto in zip(bounds, bounds[1:]):
        pieces.extend(request, offset, past, upto)
    got = pieces.run([request], offset, past=[bounds[-1]])[0]
    assert (got.first_token, got.kv_offset, got.kv_len, got.cached) == (want.first_token, offset, 90, 71)
    assert [t for t, _ in got.top_tokens] == [t for t, _ in want.top_tokens]
    torch.testing.assert_close(torch.tensor([got.logprob, *(lp for _, lp in got.top_tokens)]),
                               torch.tensor([want.logprob, *(lp for _, lp in want.top_tokens)]), rtol=0, atol=1e-5)
    torch.testing.assert_close(pieces.staging[:, :, offset : offset + 90], whole.staging[:, :, :90], rtol=0, atol=1e-5)


def generate(model, requests: list[GenerateRequest]) -> list[list[int]]:
    engine = Engine(model, EngineOptions(num_slots=4))
    return [r.token_ids for r in engine.generate(requests)]


@torch.inference_mode()
def test_prefill_then_decode_is_the_references_greedy_path_and_resumes_exactly(checkpoint):
    """The in-process engine (packed prefill, staged KV handoff, batched decode over the slot pool)
    generates what transformers' full forward predicts at every step; a request resumed after some
    of its tokens (as on another worker) continues with the same ones."""
    model, ref = load_model(checkpoint, torch.float32, torch.device("cpu")), reference(checkpoint)
    batch = prompts([50, 7, 33], seed=2)
    requests = [GenerateRequest(f"r{i}", tuple(p), 40, ignore_eos=True) for i, p in enumerate(batch)]
    outputs = generate(model, requests)
    for prompt, ours in zip(batch, outputs):
        assert len(ours) == 40
        assert_greedy(ours, prompt, ref)
    prompt, first = batch[0], outputs[0]
    resumed = GenerateRequest("again", tuple(prompt + first[:15]), 25, ignore_eos=True, resumed=15)
    assert generate(model, [resumed])[0] == first[15:]


@torch.inference_mode()
def test_seeded_sampling_resumes_exactly(checkpoint):
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    prompt = prompts([30], seed=3)[0]
    sampling = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    whole = generate(model, [GenerateRequest("s", tuple(prompt), 30, sampling, ignore_eos=True)])[0]
    rest = generate(model, [GenerateRequest("t", tuple(prompt + whole[:12]), 18, sampling, ignore_eos=True,
                                            resumed=12)])[0]
    assert rest == whole[12:]


@torch.inference_mode()
def test_penalties_over_the_last_n_tokens_are_llama_cpps_and_resume_exactly(tmp_path):
    """penalty_last_n (llama.cpp's repeat_last_n): the repetition, frequency and presence penalties
    count only the last n tokens of the prompt and the answer, sliding as the answer grows (checked
    step by step against transformers' logits with the penalties applied over that window); a
    request resumed mid-answer goes on with the same tokens."""
    path = make_checkpoint(tmp_path / "llama", *VARIANTS["llama"])
    model, ref = load_model(path, torch.float32, torch.device("cpu")), reference(path)
    prompt, n = prompts([30], seed=17)[0], 12
    sampling = SamplingParams(repetition_penalty=1.6, frequency_penalty=0.4, presence_penalty=0.3, penalty_last_n=n)
    ours = generate(model, [GenerateRequest("w", tuple(prompt), 40, sampling, ignore_eos=True)])[0]
    for i, token in enumerate(ours):
        ids = prompt + ours[:i]
        logits = ref(torch.tensor([ids])).logits[0, -1]
        counts = torch.bincount(torch.tensor(ids[-n:]), minlength=logits.shape[0])
        seen = counts > 0
        logits = torch.where(seen, torch.where(logits < 0, logits * 1.6, logits / 1.6), logits)
        logits = logits - 0.4 * counts - 0.3 * seen
        best, second = logits.topk(2).values.tolist()
        assert token == logits.argmax() or best - second < 1e-4, f"step {i}"
    whole = generate(model, [GenerateRequest("a", tuple(prompt), 40, replace(sampling, penalty_last_n=0),
                                             ignore_eos=True)])[0]
    assert whole != ours  # the window matters here
    resumed = GenerateRequest("again", tuple(prompt + ours[:17]), 23, sampling, ignore_eos=True, resumed=17)
    assert generate(model, [resumed])[0] == ours[17:]


@torch.inference_mode()
def test_longrope_goes_past_its_pretraining_length_as_transformers_does(tmp_path):
    """A request whose prompt fits the pretraining length and whose answer runs past it: the tokens
    within keep the short factors and those past it take the long ones, as in transformers' own
    cached generation (which picks the factors for each step from its length, while the keys
    already cached keep theirs). Checked step by step against transformers with its KV cache."""
    path = make_checkpoint(tmp_path / "phi3-longrope", *VARIANTS["phi3-longrope-tied"])
    model, ref = load_model(path, torch.float32, torch.device("cpu")), reference(path)
    assert model.cfg.rope.rope_type == "longrope" and model.cfg.n_positions == SHAPE["max_position_embeddings"]
    prompt = prompts([LONGROPE_ORIGINAL - 20], seed=6)[0]
    ours = generate(model, [GenerateRequest("long", tuple(prompt), 60, ignore_eos=True)])[0]
    out = ref(torch.tensor([prompt]), use_cache=True)
    for i, token in enumerate(ours):
        top2 = out.logits[0, -1].topk(2)
        best, second = top2.values.tolist()
        if token != top2.indices[0]:
            assert best - second < 1e-4 and token == top2.indices[1], f"step {i}: {token} vs {top2.indices[0]}"
        out = ref(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)  # transformers 5's name


@torch.inference_mode()
def test_a_longrope_prompt_past_its_pretraining_length_turns_all_long_as_transformers_does(tmp_path):
    """A prompt longer than the pretraining length: transformers turns every position of it with the
    long factors (it picks them from the forward's length), and so do we, in one pass or in pieces;
    its answer then matches transformers' cached generation step by step. A request resumed past the
    pretraining length after a short prompt keeps the short factors of its first attempt."""
    path = make_checkpoint(tmp_path / "phi3-longrope", *VARIANTS["phi3-longrope-tied"])
    model, ref = load_model(path, torch.float32, torch.device("cpu")), reference(path)
    prompt = prompts([LONGROPE_ORIGINAL + 30], seed=8)[0]
    want = ref(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(prefill(model.weights, *packed([prompt]), sdpa_prefill,
                                       rope_rows=torch.arange(len(prompt)) + model.cfg.n_positions)[0],
                               want, rtol=0, atol=1e-4)
    ours = generate(model, [GenerateRequest("long", tuple(prompt), 20, ignore_eos=True)])[0]
    out = ref(torch.tensor([prompt]), use_cache=True)
    for i, token in enumerate(ours):
        best, second = out.logits[0, -1].topk(2).values.tolist()
        if token != out.logits[0, -1].argmax():
            assert best - second < 1e-4, f"step {i}"
        out = ref(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
    request = GenerateRequest("long", tuple(prompt), 1, ignore_eos=True)
    cfg = model.cfg
    whole = PrefillEngine(model, 512)
    pieces = PrefillEngine(model, 64, staging=torch.empty(cfg.n_layer, 2, 512, cfg.kv_heads, cfg.head_dim))
    first = whole.run([request])[0].first_token
    pieces.extend(request, 0, 0, 64)
    pieces.extend(request, 0, 64, 128)
    assert pieces.run([request], 0, past=[128])[0].first_token == first == ours[0]
    n = len(prompt)
    torch.testing.assert_close(pieces.staging[:, :, :n], whole.staging[:, :, :n], rtol=0, atol=1e-5)
    short = prompts([LONGROPE_ORIGINAL - 10], seed=9)[0]
    answer = generate(model, [GenerateRequest("short", tuple(short), 30, ignore_eos=True)])[0]
    resumed = GenerateRequest("again", tuple(short + answer[:20]), 10, ignore_eos=True, resumed=20)
    assert generate(model, [resumed])[0] == answer[20:]


def assert_loads_to(path: Path, ref, seed: int) -> None:
    """The quantized checkpoint at `path` answers as `ref` (transformers on the weights a reference
    dequantized): prefill logits within 1e-4, greedy tokens equal."""
    model = load_model(path, torch.float32, torch.device("cpu"))
    batch = prompts([40], seed=seed)
    want = ref(torch.tensor(batch)).logits[0, -1]
    torch.testing.assert_close(prefill(model.weights, *packed(batch), sdpa_prefill)[0], want, rtol=0, atol=1e-4)
    ours = generate(model, [GenerateRequest("quantized", tuple(batch[0]), 16, ignore_eos=True)])[0]
    assert_greedy(ours, batch[0], ref)


def assert_refused_without(path: Path, config: dict, key: str, message: str) -> None:
    """With `config` as config.json and the tensor `key` taken out of the checkpoint, loading fails
    with `message`."""
    from safetensors.torch import load_file, save_file

    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    del tensors[key]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("variant, block", [("qwen3-qk-norm", [32, 32]), ("qwen3moe-norm-top", [16, 32]),
                                            ("llama", None)])
@torch.inference_mode()
def test_an_fp8_checkpoint_loads_to_transformers_logits(tmp_path, variant, block):
    """FP8 weights (per block, or one scale a weight) are dequantized at load as transformers
    dequantizes them: logits within 1e-4, greedy tokens equal."""
    from transformers import FineGrainedFP8Config

    path = make_checkpoint(tmp_path / variant, *VARIANTS[variant])
    fp8_quantize(path, block)
    cfg = load_model_config(path)
    assert cfg.fp8 and cfg.fp8_block == (None if block is None else tuple(block))
    ref = auto_model(VARIANTS[variant][0]).from_pretrained(
        path, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True, weight_block_size=block))
    assert_loads_to(path, ref, seed=11)


def test_fp8_blocks_short_at_the_edges_dequantize_as_transformers_does():
    """Where a weight's rows or columns are no multiple of the block (DeepSeek-V3's kv_a_proj, 576
    rows in blocks of 128), the last blocks are short: as transformers' own dequantization."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(70, 100, generator=gen) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 4, generator=gen)  # blocks of [32, 32]: 70 rows and 100 columns end short
    want = _dequantize_fp8_weight(weight, scale, [32, 32], torch.float32)
    assert torch.equal(fp8.dequantize(weight, scale, (32, 32), torch.float32), want)
    one = scale[:1, :1].reshape(())
    assert torch.equal(fp8.dequantize(weight, one, None, torch.float32), weight.float() * one)


def test_fp8_weights_need_their_scales_and_a_config_that_says_fp8(tmp_path):
    path = make_checkpoint(tmp_path / "llama-fp8", *VARIANTS["llama"])
    fp8_quantize(path, [32, 32])
    config = json.loads((path / "config.json").read_text())
    for quant, says in (({"quant_method": "fp8", "activation_scheme": "static"}, "'static' activation scales"),
                        ({"quant_method": "fp8", "weight_block_size": [32]}, "weight_block_size must be two")):
        (path / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
        with pytest.raises(ModelConfigError, match=says):
            load_model(path, torch.float32, torch.device("cpu"))
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(CheckpointError, match="FP8 weights are read as F8_E4M3 of a checkpoint whose config.json"):
        load_model(path, torch.float32, torch.device("cpu"))
    assert_refused_without(path, config, "model.layers.0.mlp.up_proj.weight_scale_inv",
                           "up_proj.weight in .* has no .*up_proj.weight_scale_inv beside it")


@torch.inference_mode()
def test_a_multimodal_gemma3_loads_under_either_transformers_naming(tmp_path):
    """transformers writes the text model's tensors as language_model.model.* and the head as
    language_model.lm_head (the released checkpoints' names, which transformers 5 still saves); its
    own modules are model.language_model.* and lm_head. Renamed so, the logits are the same."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "gemma3", *VARIANTS["gemma3-multimodal-untied"])
    file = path / "model.safetensors"
    prompt = packed(prompts([40], seed=7))
    want = prefill(load_model(path, torch.float32, torch.device("cpu")).weights, *prompt, sdpa_prefill)
    tensors = load_file(file)
    assert "language_model.lm_head.weight" in tensors and "language_model.model.norm.weight" in tensors
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head"):
               t for k, t in tensors.items()}
    save_file(renamed, file)
    got = prefill(load_model(path, torch.float32, torch.device("cpu")).weights, *prompt, sdpa_prefill)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gemma3_configs_before_transformers_5_read_alike(tmp_path):
    """Released Gemma 3 configs carry rope_theta, rope_local_base_freq and the full layers' scaling
    in rope_scaling; transformers 5 writes rope_parameters per layer type."""
    path = make_checkpoint(tmp_path / "gemma3", *VARIANTS["gemma3text-local-rope"])
    new = load_model_config(path)
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw |= {"rope_theta": params["full_attention"]["rope_theta"], "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    (path / "config.json").write_text(json.dumps(raw))
    assert load_model_config(path) == new and new.local_rope.theta == 1e4 and new.rope.factor == 8.0


def test_old_and_new_rope_fields_read_alike(tmp_path):
    """transformers 5 writes `rope_parameters`; configs on the hub carry `rope_theta` and
    `rope_scaling` (with `type` or `rope_type`)."""
    path = make_checkpoint(tmp_path / "llama3", "llama", VARIANTS["llama-mha-llama3"][1])
    new = load_model_config(path)
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    (path / "config.json").write_text(json.dumps(raw))
    assert load_model_config(path) == new and new.rope.rope_type == "llama3" and new.rope.factor == 8.0


def test_a_gemma_config_saying_gelu_means_its_tanh_approximation(tmp_path):
    """CodeGemma's config.json says "gelu"; transformers reads it as gelu_pytorch_tanh (and writes
    that), and so do we."""
    path = make_checkpoint(tmp_path / "gemma", "gemma", VARIANTS["gemma-mqa"][1])
    raw = json.loads((path / "config.json").read_text())
    assert raw["hidden_act"] == "gelu_pytorch_tanh"
    (path / "config.json").write_text(json.dumps(raw | {"hidden_act": "gelu"}))
    assert load_model_config(path).activation == "gelu_tanh"


@torch.inference_mode()
def test_an_mxfp4_gpt_oss_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    """gpt-oss's released format: the experts' weights as MXFP4 blocks and scales (random bytes
    here), every other tensor as it is. Loaded, its logits are transformers' on the weights that
    transformers' own dequantization makes of the same bytes."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    plain = make_checkpoint(tmp_path / "plain", *VARIANTS["gptoss-sinks-clamp"])
    tensors, gen = load_file(plain / "model.safetensors"), torch.Generator().manual_seed(3)
    quantized = dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        x, width_in, width_out = tensors[name].shape
        blocks = torch.randint(0, 256, (x, width_out, width_in // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(120, 125, (x, width_out, width_in // 32), dtype=torch.uint8, generator=gen)
        tensors[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [X, in, out]
        del quantized[name]
        quantized |= {f"{name}_blocks": blocks, f"{name}_scales": scales}
    save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
    mxfp4 = shutil.copytree(plain, tmp_path / "mxfp4")
    save_file(quantized, mxfp4 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mxfp4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mxfp4 / "config.json").write_text(json.dumps(config))

    model, ref = load_model(mxfp4, torch.float32, torch.device("cpu")), reference(plain)
    assert model.cfg.experts.mxfp4
    prompt = prompts([40])[0]
    ours = prefill(model.weights, *packed([prompt]), sdpa_prefill, logit_index=torch.arange(len(prompt)))
    torch.testing.assert_close(ours, ref(torch.tensor([prompt])).logits[0], rtol=0, atol=1e-4)


@torch.inference_mode()
def test_a_sigmoid_router_scores_in_fp32_in_a_bf16_model(tmp_path):
    """DeepSeek-V3's router (GLM-4.7-Flash's) computes its logits in fp32, as transformers does (it
    casts the hidden states and the weight): in bf16 its choices are transformers' but for ties
    closer than fp32's rounding. The bf16 model's logits stay near the fp32 one's."""
    path = make_checkpoint(tmp_path / "v3", *VARIANTS["deepseekv3-noaux"])
    half, full = (load_model(path, dtype, torch.device("cpu")) for dtype in (torch.bfloat16, torch.float32))
    assert half.weights.layers[1].router_wt.dtype == torch.float32
    assert half.weights.layers[1].experts_up.dtype == torch.bfloat16
    prompt = prompts([30])[0]
    got, want = (prefill(m.weights, *packed([prompt]), sdpa_prefill) for m in (half, full))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().softmax(-1), want.softmax(-1), rtol=0, atol=0.02)


def test_latent_attention_caches_each_tokens_vector_once():
    """DeepSeek-Coder-V2-Lite caches 512 + 64 values per token and layer: the two planes of the KV
    pool hold halves of that vector, not a copy each (nor 16 expanded heads of 192 + 128)."""
    from splitserve.bench.engine_bench import SHAPES
    from splitserve.decode_worker.kv_pool import slot_bytes

    cfg = model_config_from_dict(SHAPES["deepseek-coder-v2-lite"])
    assert (cfg.kv_heads, cfg.head_dim, cfg.decode_width, cfg.prefill_width) == (1, 288, 576, 192)
    assert slot_bytes(cfg, (1,) * cfg.n_layer, torch.bfloat16) == 27 * 576 * 2


def test_a_family_s_default_eos_ids_hold_only_where_the_config_names_none():
    """CWM's config class stands in Llama 3's three end ids for a missing eos_token_id."""
    raw = {"model_type": "cwm", **SHAPE}
    assert model_config_from_dict(raw).eos_token_ids == (2,)
    assert model_config_from_dict(raw | {"eos_token_id": None}).eos_token_ids == (128001, 128008, 128009)


def test_eos_ids_are_config_and_generation_config_together(tmp_path):
    path = make_checkpoint(tmp_path / "qwen", "qwen2", dict(eos_token_id=[2, 5]))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9], "bos_token_id": 1}))
    assert load_model_config(path).eos_token_ids == (2, 5, 9)


@pytest.mark.parametrize("fields, message", [
    ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "unsupported rope_type 'mrope'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4}},
     "longrope's long_factor must list 4 positive numbers"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5. are not supported for 'llama'"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.375}, "turns 3 of each head's 8 values"),
    ({"model_type": "stablelm", "qk_layernorm": True}, "StableLM with per-head q/k LayerNorms"),
    ({"model_type": "stablelm", "use_parallel_residual": True}, "StableLM with parallel residuals"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "Gemma 3 with bidirectional attention"),
    ({"model_type": "mistral3", "text_config": {"model_type": "llama"}}, "Mistral 3 with a 'llama' text model"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized checkpoints \\(bitsandbytes\\)"),
    ({"model_type": "gpt_oss", "quantization_config": {"quant_method": "bitsandbytes"}},
     "quantized checkpoints \\(bitsandbytes\\)"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}}, "4-bit or 8-bit weights, not 3"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}},
     "gptq or gptq_v2 format, not 'marlin'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 0}}, "group_size must be a positive"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
              "input_activations": {"num_bits": 8}}}}},
     "static input_activations are not supported"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 32, "actorder": "group"}}}}},
     "act-order groups"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}}}},
     "not 'nvfp4-pack-quantized' 4-bit 'float'"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "strategy": "block", "block_structure": [128, 128]}}}}}, "not 'block'"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 32}},
        "b": {"weights": {"num_bits": 8, "strategy": "channel"}}}}}, "one weight quantization and format for every"),
    ({"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}, "intermediate_size": 48},
     "MXFP4 experts need hidden_size \\(64\\) and their width \\(48\\) in multiples of 32"),
    ({"num_key_value_heads": 3}, "8 attention heads are not divisible by 3 key/value heads"),
    ({"model_type": "qwen3_next"}, "unsupported model_type 'qwen3_next': splitserve runs .*qwen3_moe"),
    ({"model_type": "deepseek_v3", **LATENT, "topk_method": "greedy"}, "deepseek_v3 routes with a sigmoid and noaux"),
    ({"model_type": "deepseek_v2", **LATENT, "topk_method": "noaux_tc"}, "a softmax, greedy or group_limited_greedy"),
    ({"model_type": "deepseek_v2", **LATENT, "attention_bias": True}, "deepseek_v2 with attention_bias"),
    ({"model_type": "deepseek_v2", **LATENT, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
     "8 experts in 3 groups, 1 kept"),
    ({"model_type": "deepseek_v2", **LATENT, "qk_rope_head_dim": 7},
     "qk_rope_head_dim 7 and kv_lora_rank 32 must be even"),
    ({"model_type": "qwen3_moe", "moe_intermediate_size": 20}, "the experts. width 20 must be multiples of 8"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok 5 of 4 experts"),
])
def test_bad_configs_get_clear_errors(tmp_path, fields, message):
    raw = {"model_type": "llama", **SHAPE, **fields}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=message):
        load_model_config(tmp_path)


@pytest.fixture(scope="module")
def served_checkpoints(tmp_path_factory):
    """variant -> its checkpoint, made once for the module."""
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_checkpoint(tmp_path_factory.mktemp(f"served-{variant}"), *VARIANTS[variant])
        return made[variant]

    return get


def test_a_served_longrope_model_keeps_long_prompts_apart_in_the_prefix_cache(home, served_checkpoints):
    """A long prompt under LongRoPE turns every position with the long factors, so its start's K/V
    differ from those of a short prompt with the same ids: the prefill worker's prefix cache keeps
    them apart, whole or in pieces, and every answer equals the in-process engine's."""
    path = served_checkpoints("phi3-longrope-tied")
    model = load_model(path, torch.float32, torch.device("cpu"))
    ids = prompts([LONGROPE_ORIGINAL + 40], seed=10)[0]
    asks = [ids[:100], ids, ids[:LONGROPE_ORIGINAL + 20], ids[:110]]  # short, long, long (cached), short (cached)
    want = generate(model, [GenerateRequest(f"r{i}", tuple(p), 8, ignore_eos=True) for i, p in enumerate(asks)])
    with Cluster(home, model=str(path), kv_transport="tcp") as c:
        c.add_worker("prefill", "--kv-transport", "tcp", "--prefill-chunk-tokens", "48")
        c.add_worker("decode", "--kv-transport", "tcp", "--num-slots", "4")
        c.wait_registered()
        with Client(c.endpoint) as client:
            got = [client.generate(prompt_ids=p, max_new_tokens=8, ignore_eos=True, timeout=120).token_ids
                   for p in asks]
    assert got == want


def test_a_decode_worker_sizes_its_pool_by_its_layers_rings(home, served_checkpoints):
    """gpt-oss's windowed layers (every other one) keep a ring of 24 keys per slot: the memory a
    decode worker is given holds as many slots as those rings leave room for, not as many whole
    ones."""
    path = served_checkpoints("gptoss-sinks-clamp")
    cfg = load_model_config(path)
    slot = cfg.n_positions
    keys = [24 if window else slot for window in cfg.windows]
    assert set(cfg.windows) == {0, WINDOW} and 24 in keys
    per_slot, whole = 2 * cfg.kv_dim * sum(keys) * 4, 2 * cfg.kv_dim * slot * cfg.n_layer * 4  # fp32
    with Cluster(home, model=str(path)) as c:
        decode = c.add_worker("decode", "--max-total-tokens", str(slot), "--kv-cache-memory-mb", "1")
        c.wait_registered()
        assert c.health(decode)["slots_total"] == 2**20 // per_slot > 2**20 // whole


# Qwen2-shaped: grouped-query, q/k/v biases, a tied head, a window on its later layers; and a
# mixture of experts (the transports move K/V alike whatever the MLP)
@pytest.mark.parametrize("variant, transport, chunk", [
    ("qwen2-bias-tied-window", "shm", "8192"), ("qwen2-bias-tied-window", "tcp", "8192"),
    ("qwen2-bias-tied-window", "shm", "7"), ("qwen3moe-norm-top", "shm", "7"), ("deepseekv2-lite-yarn", "tcp", "7"),
    ("gemma3-multimodal-untied", "shm", "7"), ("gptoss-sinks-clamp", "tcp", "7"), ("starcoder2-window", "tcp", "8192")],
    ids=["shm", "tcp", "shm-in-pieces", "experts-shm-in-pieces", "latent-tcp-in-pieces", "multimodal-shm-in-pieces",
         "sinks-tcp-in-pieces", "ring-slots-tcp"])
def test_a_served_llama_shaped_model_equals_the_engine(home, served_checkpoints, variant, transport, chunk):
    """Gateway and worker processes on a Llama-shaped checkpoint: several KV heads cross the
    handoff (the multi-query `tiny` would hide a layout mistake), windows and rotary positions
    hold in the decode worker, as do the experts of a mixture and latent attention's cached
    vectors (one head of the compressed K/V and the rotary key), every process reads a
    multimodal checkpoint's text model (Gemma 3), gpt-oss's sinks hold in the decode worker's
    steps and the prefill worker's pieces, and a model with a window on every layer (StarCoder2)
    keeps ring-long slots that take each prompt's last ring of keys; greedy and seeded sampled
    requests equal the in-process engine's, also with their prompts prefilled in pieces of 7
    tokens."""
    served_checkpoint = served_checkpoints(variant)
    specs = request_specs(9)
    model = load_model(served_checkpoint, torch.float32, torch.device("cpu"))
    with Cluster(home, model=str(served_checkpoint), kv_transport=transport) as c:
        c.add_worker("prefill", "--kv-transport", transport, "--prefill-chunk-tokens", chunk)
        c.add_worker("decode", "--kv-transport", transport, "--num-slots", "8")
        c.wait_registered()
        assert stream_all(c.endpoint, specs) == offline(model, specs)
        c.wait_idle()


@pytest.mark.parametrize("variant, group, zero_point", [("qwen2-bias-tied-window", 32, True), ("llama", 16, False),
                                                        ("qwen3moe-norm-top", 32, True)])
@torch.inference_mode()
def test_an_awq_checkpoint_loads_to_the_logits_of_its_dequantized_weights(tmp_path, variant, group, zero_point):
    """AWQ's 4-bit weights (AutoAWQ's GEMM layout; with zero points or centred on 8) are dequantized at
    load as compressed-tensors dequantizes them: logits within 1e-4 of transformers' on those weights,
    greedy tokens equal."""
    path = make_checkpoint(tmp_path / variant, *VARIANTS[variant])
    ref = reference(awq_quantize(path, group, zero_point))
    assert load_model_config(path).weight_quant == WeightQuant("awq", 4, group, zero_point)
    assert_loads_to(path, ref, seed=12)


def test_awq_weights_need_their_parts_and_the_layout_read(tmp_path):
    path = make_checkpoint(tmp_path / "llama-awq", *VARIANTS["llama"])
    awq_quantize(path, 32, True)
    config = json.loads((path / "config.json").read_text())
    awq_config = config["quantization_config"]
    for quant, says in (({"bits": 8}, "4-bit weights .* not version 'gemm' with 8 bits"),
                        ({"version": "gemv"}, "not version 'gemv'"), ({"group_size": 0}, "group_size must be")):
        (path / "config.json").write_text(json.dumps(config | {"quantization_config": awq_config | quant}))
        with pytest.raises(ModelConfigError, match=says):
            load_model(path, torch.float32, torch.device("cpu"))
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": awq_config | {"group_size": 16}}))
    with pytest.raises(CheckpointError, match=r"proj.q\w+ in .* has shape \(\d+, \d+\), expected .* of the AWQ weight"):
        load_model(path, torch.float32, torch.device("cpu"))
    assert_refused_without(path, config, "model.layers.0.mlp.up_proj.qzeros",
                           "AWQ tensor .*up_proj.qweight in .* has no .*up_proj.qzeros beside it")


@pytest.mark.parametrize("variant, bits, group, act_order, v2", [
    ("qwen2-bias-tied-window", 4, 32, True, False), ("llama", 8, -1, False, True),
    ("qwen3moe-norm-top", 4, 16, False, False)])
@torch.inference_mode()
def test_a_gptq_checkpoint_loads_to_the_logits_of_its_dequantized_weights(tmp_path, variant, bits, group, act_order,
                                                                         v2):
    """GPTQ's 4-bit and 8-bit weights (AutoGPTQ's packing; groups of input rows in order or scattered
    by act-order's g_idx, or one group; zeros stored one less, or as they are in gptq_v2) are
    dequantized at load to the weights they stand for: logits within 1e-4 of transformers' on
    those, greedy tokens equal."""
    path = make_checkpoint(tmp_path / variant, *VARIANTS[variant])
    ref = reference(gptq_quantize(path, bits, group, act_order, v2))
    assert load_model_config(path).weight_quant == WeightQuant("gptq", bits, max(group, 0), zeros_minus_one=not v2)
    assert_loads_to(path, ref, seed=13)


@pytest.mark.parametrize("variant, fmt, weights, activations", [
    ("qwen2-bias-tied-window", "pack-quantized", dict(num_bits=4, strategy="group", group_size=32), None),
    ("qwen3moe-norm-top", "pack-quantized", dict(num_bits=4, strategy="group", group_size=16, symmetric=False), None),
    ("llama", "pack-quantized", dict(num_bits=8, strategy="channel", symmetric=False), None),
    ("llama", "int-quantized", dict(num_bits=8, strategy="channel"), DYNAMIC["int"]),
    ("llama", "int-quantized", dict(num_bits=8, strategy="channel"), "zeros"),
    ("qwen2-bias-tied-window", "float-quantized", dict(num_bits=8, type="float", strategy="channel"), DYNAMIC["float"]),
    ("llama", "float-quantized", dict(num_bits=8, type="float", strategy="block", block_structure=[16, 32]),
     DYNAMIC["float"]),
    ("llama", "float-quantized", dict(num_bits=8, type="float", strategy="tensor"), None),
], ids=["w4a16", "w4a16-asym-experts", "w8a16-asym", "w8a8", "w8a8-stored-zeros", "fp8-dynamic", "fp8-block",
        "fp8-tensor"])
@torch.inference_mode()
def test_a_compressed_tensors_checkpoint_loads_to_the_logits_of_its_dequantized_weights(tmp_path, variant, fmt, weights,
                                                                                      activations):
    """compressed-tensors' formats (packed integers, int8 and float8 weights; tensor, channel, group
    and block scales; with zero points or symmetric) are dequantized at load as compressed-tensors
    decompresses them: logits within 1e-4 of transformers' on those weights, greedy tokens equal.
    Activations stay unquantized."""
    path = make_checkpoint(tmp_path / variant, *VARIANTS[variant])
    keep_zeros = activations == "zeros"
    activations = DYNAMIC["int"] if keep_zeros else activations
    ref = reference(compressed_tensors_quantize(path, fmt, weights, activations, keep_zeros))
    if keep_zeros:
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            assert any(k.endswith("weight_zero_point") for k in f.keys())
    quant = load_model_config(path).weight_quant
    assert (quant.method, quant.packed, quant.floats, quant.strategy) == (
        "compressed-tensors", fmt == "pack-quantized", fmt == "float-quantized", weights["strategy"])
    assert_loads_to(path, ref, seed=14)

