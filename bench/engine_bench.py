"""`splitserve bench engine`: splitserve's engines against transformers' `generate`, on the very
same weight tensors, dtype, device and threads, in one process.

The curves that show where time goes: decode time per step against batch size and against key length, prefill time
against prompt length and batch size (plus a packed mixed batch), each with a floor: the time of
the step's weight matrix products alone, which no implementation can go below.

What a row means:
- decode `ms` is per step. splitserve: N steps of a `DecodeEngine` whose B slots start from random
  KV of the prompt's length (the values don't change the work). transformers:
  (generate(N + 1 new tokens) - generate(1 new token)) / N with its default cache, which leaves
  out its prefill.
- decode `key_len` is the mean number of keys a step attends: prompt_len + new_tokens // 2.
- prefill `ms`: splitserve `PrefillEngine.run` (sampling the first token included); transformers
  `generate(max_new_tokens=1)`, which also computes only the last position's logits. The mixed
  batch is packed for splitserve and left-padded to its longest prompt for transformers; its
  `prompt_len` is the total of its prompts' tokens.
- `floor_ms`: every layer's c_attn, attn c_proj, mlp c_fc and mlp c_proj as one `addmm` each on the
  step's tokens, plus the LM head on one row per sequence.
- `ms` and `floor_ms` are medians: after a warm-up, a point runs rounds of one floor, one
  splitserve and one transformers sample in turn (so that a shared machine's slow spells fall on
  all three alike), at least --repeats rounds and more (up to MAX_RUNS) until --min-seconds have
  passed.
- `peak_mem_mb`: of a system's warm-up and one run, taken before the next system runs. CUDA
  `max_memory_allocated`, reset per measurement. On the CPU the process's peak RSS from
  `getrusage`, weights included: a running maximum, which this resets before each measurement
  through /proc/self/clear_refs where the kernel allows it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

from splitserve.common.config import add_model_args

from .output import add_output_args

MIXED_LENS = (32, 96, 160, 224, 288, 352, 416, 512)
PREFILL_BATCH_PROMPT = 128
MAX_RUNS = 200
KEY_BUCKET = 8
# --shape NAME: random weights of a released model's shape (config.json fields), or a small one.
SHAPES = {
    "santacoder": dict(
        model_type="gpt_bigcode", vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16,
        multi_query=True, activation_function="gelu_pytorch_tanh", bos_token_id=49152, eos_token_id=49152),
    # the built-in tiny model's shape as a Llama
    "llama-tiny": dict(
        model_type="llama", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, intermediate_size=688, bos_token_id=0, eos_token_id=0),
    "qwen2.5-coder-1.5b": dict(
        model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, hidden_size=1536,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151643),
    "qwen2.5-coder-7b": dict(
        model_type="qwen2", vocab_size=152064, max_position_embeddings=32768, hidden_size=3584,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151643),
    # llama-tiny's attention with 8 experts, 2 per token, in every layer
    "qwen3-moe-tiny": dict(
        model_type="qwen3_moe", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=688, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True, bos_token_id=0, eos_token_id=0),
    "qwen3-coder-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, max_position_embeddings=262144, hidden_size=2048,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=5472,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        rope_theta=10000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645),
    # llama-tiny's size as Phi-4-mini is laid out: fused projections, rotary embeddings on 24 of each
    # head's 32 values, LongRoPE's long factors past 1,024 positions
    "phi3-tiny": dict(
        model_type="phi3", vocab_size=8192, max_position_embeddings=2048, original_max_position_embeddings=1024,
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=688,
        partial_rotary_factor=0.75, rope_scaling={"type": "longrope", "short_factor": [1 + i / 20 for i in range(12)],
                                                  "long_factor": [1 + i / 2 for i in range(12)]},
        bos_token_id=0, eos_token_id=0, pad_token_id=0),
    # llama-tiny's size as GLM-4-0414 is laid out: sandwich norms, interleaved rotary pairs on half of each head
    "glm4-tiny": dict(
        model_type="glm4", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=688, partial_rotary_factor=0.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "glm-4-9b-0414": dict(
        model_type="glm4", vocab_size=151552, max_position_embeddings=32768, hidden_size=4096, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=13696, partial_rotary_factor=0.5,
        rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
        eos_token_id=[151329, 151336, 151338], pad_token_id=151329),
    # llama-tiny's size as StarCoder2 is laid out: biases, LayerNorm, a gelu MLP, the same window on every
    # layer (so a slot keeps only that ring of keys)
    "starcoder2-tiny": dict(
        model_type="starcoder2", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, intermediate_size=688, sliding_window=64, bos_token_id=0,
        eos_token_id=0),
    # llama-tiny's size as Gemma 2 is laid out: capped scores and logits, sandwich norms, a window on every other layer
    "gemma2-tiny": dict(
        model_type="gemma2", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=688, query_pre_attn_scalar=32,
        sliding_window=64, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gemma-2-9b": dict(
        model_type="gemma2", vocab_size=256000, max_position_embeddings=8192, hidden_size=3584, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, intermediate_size=14336,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # llama-tiny's size as Gemma 3 is laid out: q/k norms, windowed layers with their own rotary base
    "gemma3-tiny": dict(
        model_type="gemma3_text", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=688, query_pre_attn_scalar=32,
        sliding_window=64, sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # the text model of the multimodal checkpoint
    "gemma-3-12b": dict(
        model_type="gemma3_text", vocab_size=262208, max_position_embeddings=131072, hidden_size=3840,
        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256, intermediate_size=15360,
        query_pre_attn_scalar=256, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
        bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
    # llama-tiny's size as Ministral 3 is laid out: YaRN past 64 positions, and Llama 4's attention
    # temperature from there on
    "ministral3-tiny": dict(
        model_type="ministral3", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=688,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 32.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.1}, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # llama-tiny's size as gpt-oss is laid out: attention sinks, a window on every other layer, 8
    # experts with biases and the clamped SwiGLU, 2 per token, in every layer
    "gpt-oss-tiny": dict(
        model_type="gpt_oss", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=128, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=64, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, max_position_embeddings=131072, hidden_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880, num_local_experts=32,
        num_experts_per_tok=4, sliding_window=128, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=199998,
        eos_token_id=200002, pad_token_id=199999),
    "glm-4.7-flash": dict(
        model_type="glm4_moe_lite", vocab_size=154880, max_position_embeddings=202752, hidden_size=2048,
        num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, kv_lora_rank=512, q_lora_rank=768,
        qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, intermediate_size=10240, n_routed_experts=64,
        num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=1536, routed_scaling_factor=1.8,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
    "phi-4": dict(
        model_type="phi3", vocab_size=100352, max_position_embeddings=16384, hidden_size=5120, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=10, intermediate_size=17920, rope_theta=250000.0,
        rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False, bos_token_id=100257, eos_token_id=100265),
    "stable-code-3b": dict(
        model_type="stablelm", vocab_size=50304, max_position_embeddings=16384, hidden_size=2560, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, intermediate_size=6912, partial_rotary_factor=0.25,
        rope_theta=1000000.0, layer_norm_eps=1e-5, use_qkv_bias=False, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0),
    # latent attention (a cache of 64 + 16 per token and layer) and DeepSeek's experts, at llama-tiny's size
    "deepseek-v2-tiny": dict(
        model_type="deepseek_v2", vocab_size=8192, max_position_embeddings=2048, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, intermediate_size=688, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, moe_intermediate_size=128, first_k_dense_replace=1, bos_token_id=0, eos_token_id=0),
    "deepseek-coder-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, max_position_embeddings=163840, hidden_size=2048,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, intermediate_size=10944, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408, first_k_dense_replace=1,
        rope_theta=10000, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
}


@dataclass(frozen=True)
class Sweep:
    batch_sizes: list[int]
    prompt_len: int
    new_tokens: int
    repeats: int
    min_seconds: float
    key_lens: list[int]
    key_batches: list[int]
    prefill_lens: list[int]
    prefill_batches: list[int]
    mixed: bool = True  # the packed batch of MIXED_LENS prompts


def default_sweep(gpu: bool, quick: bool) -> Sweep:
    if quick:  # under a minute on 2 cores with the tiny model, batch 1 and 64 kept
        return Sweep([1, 8, 64], 64, 8, 1, 0.2, [512], [1], [32, 512], [1, 4])
    return Sweep(
        batch_sizes=[2**i for i in range(9 if gpu else 7)],
        prompt_len=64,
        new_tokens=64,
        repeats=5,
        min_seconds=1.0,
        key_lens=[128, 512, 1024, 1920],
        key_batches=[1, 64 if gpu else 16],
        prefill_lens=[32, 128, 512, 1024],
        prefill_batches=[1, 2, 4, 8],
    )


# --- command line ------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # --threads 0 (the default) means every core this process may use
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="random weights of this model's shape instead of --model's checkpoint")
    p.add_argument("--quick", action="store_true", help="a small sweep with few repeats (under a minute, tiny model)")
    sweep = p.add_argument_group("sweep (defaults depend on --quick and the device)")
    sweep.add_argument("--batch-sizes", type=int_list, help="decode batch sizes, e.g. 1,2,4")
    sweep.add_argument("--prompt-len", type=int, help="decode prompt length of the batch curve (default 64)")
    sweep.add_argument("--new-tokens", type=int, help="decode steps timed per measurement (default 64)")
    sweep.add_argument("--repeats", type=int, help="timed runs per measurement at least; the median is reported")
    sweep.add_argument("--min-seconds", type=float, help="more runs, up to %d, until a measurement has taken this long"
                       % MAX_RUNS)
    sweep.add_argument("--key-lens", type=int_list, help="mean key lengths of the key-length curve ('' skips it)")
    sweep.add_argument("--key-batches", type=int_list, help="batch sizes of the key-length curve")
    sweep.add_argument("--prefill-lens", type=int_list, help="batch-1 prefill prompt lengths ('' skips them)")
    sweep.add_argument("--prefill-batches", type=int_list,
                       help=f"prefill batch sizes of {PREFILL_BATCH_PROMPT}-token prompts ('' skips them)")
    sweep.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=None,
                       help=f"the prefill of {len(MIXED_LENS)} mixed-length prompts packed (default: on)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    add_output_args(p)


def sweep_from_args(args: argparse.Namespace, gpu: bool) -> Sweep:
    given = {f.name: getattr(args, f.name) for f in fields(Sweep) if getattr(args, f.name) is not None}
    return replace(default_sweep(gpu, args.quick), **given)


def run(args: argparse.Namespace) -> int:
    # PyTorch, transformers and matplotlib only when a benchmark runs
    import torch

    from splitserve.common.builtin_models import resolve_model
    from splitserve.common.runtime import DTYPE_NAMES, resolve_device, resolve_dtype, set_threads

    from .engine_runs import (SplitserveRunner, TransformersRunner, all_cores, describe_device, format_table,
                              load_models, measure, plan, Repeats)
    from .output import save
    from .plots import plot_engine

    threads = args.threads or all_cores()
    set_threads(threads)
    device = resolve_device(args.device)
    path = None if args.shape else resolve_model(args.model, args.home, revision=args.revision)
    dtype = resolve_dtype(args.dtype, device, path)
    sweep = sweep_from_args(args, device.type == "cuda")
    hf, model = load_models(path, args.shape, device, dtype)
    points = plan(sweep, model.cfg.n_positions)
    repeats = Repeats(sweep.repeats, sweep.min_seconds)
    runners = {"splitserve": SplitserveRunner(model, points)}
    if not args.no_transformers:
        runners["transformers"] = TransformersRunner(hf, (model.cfg.eos_token_ids or (0,))[0], device)
    with torch.inference_mode():
        results = measure(points, model, runners, repeats)
    model_name = f"{args.shape}-shape (random weights)" if args.shape else args.model
    doc = {"device": describe_device(device, threads), "model": model_name, "dtype": DTYPE_NAMES[dtype],
           "threads": threads, "results": results}
    print(format_table(results))
    save(doc, args.json, args.plot_dir, f"engine-{device.type}-{args.shape or Path(args.model).name}", plot_engine)
    return 0
