"""The shape of a model, read from a Hugging Face checkpoint's `config.json` (and the end-of-sequence
ids of its `generation_config.json`). One ModelConfig describes every supported family; the family
modules (common/families/) read their own fields, with transformers' defaults for the
fields a config leaves out. Imports no torch: the gateway reads configs too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal


class ModelConfigError(ValueError):
    """A config.json that does not describe a model we can run."""


# transformers' activation names, as families spell them, mapped to our kernels.
ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclass(frozen=True)
class WeightQuant:
    """How an AWQ, GPTQ or compressed-tensors checkpoint stores its projections' weights: values of
    `bits` (integers, or compressed-tensors' float8) with scales (in groups of `group` input columns,
    or per `strategy`) and, where `zero_point`, zero points."""

    method: Literal["awq", "gptq", "compressed-tensors"]
    bits: int
    group: int  # 0: one group of all the input columns (GPTQ's group_size -1), or no groups
    zero_point: bool = True  # AWQ, compressed-tensors: zero points stored (else centred: symmetric)
    zeros_minus_one: bool = True  # GPTQ: its zeros stored one less (AutoGPTQ's format, not gptq_v2)
    # compressed-tensors: the scales' layout, "tensor" (one), "channel" (one an output row), "group"
    # or "block" ([rows, columns] blocks: `block`); its values packed into int32s ("pack-quantized"),
    # or the weight itself int8 ("int-quantized") or float8 e4m3 ("float-quantized", `floats`)
    strategy: str = "group"
    block: tuple[int, int] | None = None
    packed: bool = True
    floats: bool = False


@dataclass(frozen=True)
class Rope:
    """Rotary position embeddings: the frequencies of one scaling (`rope_type`) and its parameters,
    as transformers' ROPE_INIT_FUNCTIONS compute them (common/blocks.py rope_tables)."""

    rope_type: Literal["default", "linear", "dynamic", "llama3", "yarn", "longrope"]
    theta: float
    factor: float = 1.0
    original_max_positions: int = 0  # llama3, yarn, dynamic, longrope, Llama 4's temperature: the pretraining length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: the cos/sin scale; None: from factor and mscale
    mscale: float = 0.0  # yarn
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    # each head's rotary values turn in pairs (x0, x1), (x2, x3)... (GLM); else (x0, x(P/2)), ...
    # (rotate_half's halves). Loading reorders the q and k rows into halves, so the forward has one way.
    interleaved: bool = False
    dim: int = 0  # the width of each head that is turned (partial_rotary_factor); 0: all of it
    # longrope: per-frequency divisors [dim / 2] within the pretraining length, and past it
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # the queries at position p times 1 + beta * log(1 + floor(p / original_max_positions)): Llama
    # 4's attention temperature (`llama_4_scaling_beta`, Ministral 3); 0: none
    llama4_scaling_beta: float = 0.0


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP (Qwen3-MoE, Mixtral, DeepSeek-V2/V3): a router picks `per_token` of
    `count` gated MLPs of width `inner` for each token and weights their outputs."""

    count: int
    per_token: int
    inner: int
    norm_top: bool  # the chosen experts' weights renormalized to sum to 1
    layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of n_inner
    scale: float = 1.0  # the chosen experts' weights multiplied by this (after any renormalizing)
    shared: int = 0  # the width of a gated MLP every token goes through beside its experts; 0: none
    # (groups, kept): experts fall into `groups` groups and a token chooses among the `kept` groups
    # holding its best scores only (DeepSeek's group-limited routing); None: among all
    groups: tuple[int, int] | None = None
    group_score: Literal["max", "top2"] = "max"  # a group's score: its best expert's, or its best two's sum
    # each expert scored by a sigmoid of its logit (DeepSeek-V3, GLM-4.7-Flash), else by a softmax over all
    sigmoid: bool = False
    # a per-expert bias (the router's e_score_correction_bias) added to the scores for the choice only
    router_bias: bool = False
    # biases on the router's logits and on every expert's projections (gpt-oss)
    biased: bool = False
    # gpt-oss's clamped SwiGLU: gate capped at `clamp` and up clamped to +-clamp, then
    # gate * sigmoid(alpha * gate) * (up + 1); 0: the model's activation of gate times up
    clamp: float = 0.0
    alpha: float = 1.0
    # the stacked experts' weights stored in MXFP4 (common/mxfp4.py; gpt-oss's released checkpoints)
    mxfp4: bool = False

    def check(self, n_embd: int) -> Experts:
        """Itself, if the forward can run it with a hidden width of n_embd; else a clear error."""
        if not 0 < self.per_token <= self.count:
            raise ModelConfigError(f"num_experts_per_tok {self.per_token} of {self.count} experts")
        if n_embd % 8 or self.inner % 8:  # the grouped matrix product wants rows of 16-byte multiples
            raise ModelConfigError(f"hidden_size {n_embd} and the experts' width {self.inner} must be multiples of 8")
        if self.mxfp4 and (n_embd % 32 or self.inner % 32):  # each row of a weight whole blocks of 32
            raise ModelConfigError(f"MXFP4 experts need hidden_size ({n_embd}) and their width ({self.inner}) in "
                                   "multiples of 32")
        if self.groups is not None:
            groups, kept = self.groups
            if groups < 1 or self.count % groups or not 0 < kept <= groups or \
                    kept * self.count // groups < self.per_token:
                raise ModelConfigError(f"{self.count} experts in {groups} groups, {kept} kept, cannot give "
                                       f"{self.per_token} experts per token")
        return self


@dataclass(frozen=True)
class Latent:
    """Multi-head latent attention (DeepSeek-V2): each token's keys and values come from one
    compressed vector of `kv_rank` (normalized) and one rotary key of `rope_dim` shared by every
    head, and only those are cached: kv_rank + rope_dim values per token, split in two halves
    that the cache's key and value planes hold (one "head" of half that width each). Each head's
    key is (its up-projection of the vector, the rotary key), its value another up-projection; the
    forward folds those projections into the query and the output instead of expanding the cache
    (common/model.py latent_qk, latent_out)."""

    kv_rank: int
    q_rank: int  # queries from a compressed vector of this width (normalized); 0: from the hidden state
    nope_dim: int  # per head: the query and key width without positions
    rope_dim: int  # per head: the rotary width
    v_dim: int  # per head: the value width


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    n_positions: int  # the longest sequence the model serves
    n_embd: int
    n_layer: int
    n_head: int
    kv_heads: int  # 1: multi-query; n_head: multi-head; between: grouped-query
    head_dim: int
    n_inner: int  # the MLP's hidden width
    norm: Literal["layer", "rms"]  # LayerNorm with a bias, or RMSNorm
    layer_norm_epsilon: float
    mlp: Literal["plain", "gated"]  # act(x W_fc) W_proj, or act(x W_gate) * (x W_up) W_down
    activation: str  # one of ACTIVATIONS' values
    qkv_bias: bool
    out_bias: bool  # the attention output projection's
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each query and key head (Qwen3)
    rope: Rope | None  # None: learned absolute positions (GPTBigCode)
    windows: tuple[int, ...]  # per layer: attend only the last W keys (0: every key)
    tie_word_embeddings: bool
    scale_attn_weights: bool = True
    # the attention's softmax scale where the family sets its own (Granite's attention_multiplier,
    # DeepSeek-V2's over its heads of nope + rope); None: 1 / sqrt(head_dim), or 1 without scale_attn_weights
    softmax_scale: float | None = None
    experts: Experts | None = None  # mixture-of-experts MLPs, in the layers it names
    # multi-head latent attention; then kv_heads is 1 and head_dim half of kv_rank + rope_dim
    latent: Latent | None = None
    embed_scale: float = 1.0  # the embeddings' multiplier on the way in (Gemma: sqrt(n_embd))
    norm_offset: float = 0.0  # RMSNorm multiplies by offset + weight (Gemma: 1)
    residual_scale: float = 1.0  # each sublayer's output joins the residual stream times this (Granite)
    logits_scale: float = 1.0  # the logits are divided by this (Granite)
    # each sublayer's output normalized (its own RMSNorm or LayerNorm) before it joins the residual
    # stream (GLM-4, Gemma 2); no family has these and residual_scale both
    sandwich_norms: bool = False
    # the attention and the MLP both read the first norm's output and join the residual stream
    # together (Phi): no second norm
    parallel_residual: bool = False
    lm_head_bias: bool = False  # the LM head has a bias (Phi)
    # scores / logits s become c * tanh(s / c) (Gemma 2's attn_logit_ and final_logit_softcapping); 0: none
    attn_softcap: float = 0.0
    logits_softcap: float = 0.0
    # the rotary embeddings of the layers local_layers names, where they differ from `rope` (Gemma 3's
    # sliding-window layers turn at their own base frequency); None: every layer's are `rope`
    local_rope: Rope | None = None
    local_layers: tuple[bool, ...] = ()
    # each query head has a learned logit of its own in every softmax, a key with no value (gpt-oss's
    # attention sinks): the weights of the real keys sum to less than 1
    attn_sinks: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of them ends a sequence
    # an FP8 checkpoint's scale blocks [rows, columns] (common/fp8.py); None with one scale a weight
    fp8_block: tuple[int, int] | None = None
    fp8: bool = False  # its weights stored as FP8 are dequantized at load
    # an AWQ, GPTQ or compressed-tensors checkpoint's weights, dequantized at load (common/awq.py,
    # gptq.py, compressed.py)
    weight_quant: WeightQuant | None = None

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def multi_query(self) -> bool:
        return self.kv_heads == 1

    @property
    def attn_scale(self) -> float:
        if self.softmax_scale is not None:
            return self.softmax_scale
        return self.head_dim**-0.5 if self.scale_attn_weights else 1.0

    @property
    def decode_width(self) -> int:
        """The width of each query head's products with the cache in a decode step: head_dim, or
        latent attention's whole cached vector (both planes)."""
        return self.head_dim if self.latent is None else 2 * self.head_dim

    @property
    def prefill_width(self) -> int:
        """The width of each head in prefill attention: head_dim, or latent attention's heads
        expanded from the cached vectors (key width without positions + rotary width)."""
        return self.head_dim if self.latent is None else self.latent.nope_dim + self.latent.rope_dim

    @property
    def rope_dim(self) -> int:
        """The width each head's rotary embedding turns: its first rope_dim values (latent
        attention: its rotary part)."""
        if self.latent is not None:
            return self.latent.rope_dim
        return self.rope.dim if self.rope is not None and self.rope.dim else self.head_dim

    def fingerprint(self, vocab_size: int) -> str:
        """Identifies the model shape and the tokenizer's vocabulary, so that processes can refuse a
        mismatched peer."""
        blob = json.dumps([asdict(self), vocab_size], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def eos_ids(*values) -> tuple[int, ...]:
    """The end-of-sequence ids named by config fields (an int, a list of ints, or None), each once."""
    ids: list[int] = []
    for value in values:
        for i in value if isinstance(value, list) else [] if value is None else [value]:
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def model_config_from_dict(raw: dict, generation: dict | None = None) -> ModelConfig:
    """`raw`: config.json; `generation`: generation_config.json, whose end-of-sequence ids stop a
    sequence too."""
    from .families import family_of  # the family table imports this module

    family = family_of(raw.get("model_type"))
    quant = raw.get("quantization_config") or {}
    method = quant.get("quant_method", "?") if quant else None
    if method is not None and method not in ("fp8", *WEIGHT_QUANT) and method not in getattr(family, "QUANTIZED", ()):
        # the family's own (gpt-oss's MXFP4 experts), or FP8, AWQ, GPTQ and compressed-tensors for every family
        raise ModelConfigError(f"quantized checkpoints ({method}) are not supported for {raw.get('model_type')!r}: "
                               "serve the unquantized weights (fp32, fp16 or bf16), or an FP8, AWQ, GPTQ or "
                               "compressed-tensors checkpoint")
    if method == "fp8" and quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ModelConfigError(f"FP8 checkpoints with {quant['activation_scheme']!r} activation scales are not "
                               "supported: only dynamic ones (the weights are dequantized at load)")
    try:
        cfg = family.config(raw)
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks the field {e.args[0]!r}") from None
    if cfg.n_head % cfg.kv_heads:
        raise ModelConfigError(f"{cfg.n_head} attention heads are not divisible by {cfg.kv_heads} key/value heads")
    # the family's own (a multimodal checkpoint's text model's) where config.json's top level names none
    eos = eos_ids(raw.get("eos_token_id"), (generation or {}).get("eos_token_id"), list(cfg.eos_token_ids))
    bos = raw["bos_token_id"] if raw.get("bos_token_id") is not None else cfg.bos_token_id
    quantized = _fp8(quant) if method == "fp8" else {"weight_quant": WEIGHT_QUANT[method](quant)} \
        if method in WEIGHT_QUANT else {}
    return replace(cfg, eos_token_ids=eos, bos_token_id=bos, **quantized)


def _fp8(quant: dict) -> dict:
    block = quant.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelConfigError(f"quantization_config's weight_block_size must be two positive integers, got {block!r}")
    return {"fp8": True, "fp8_block": None if block is None else tuple(block)}


def _packed_ints(quant: dict) -> WeightQuant:
    method, bits, group = quant["quant_method"], quant.get("bits"), quant.get("group_size")
    if method == "awq":
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ModelConfigError(f"AWQ checkpoints are read in AutoAWQ's GEMM layout of 4-bit weights (version "
                                   f"gemm, bits 4), not version {version!r} with {bits!r} bits")
    elif bits not in (4, 8):
        raise ModelConfigError(f"GPTQ checkpoints are read with 4-bit or 8-bit weights, not {bits!r} bits")
    if method == "gptq" and group == -1:
        group = 0
    elif not (isinstance(group, int) and group > 0):
        raise ModelConfigError(f"quantization_config's group_size must be a positive integer, got {group!r}")
    fmt = str(quant.get("checkpoint_format", "gptq")).lower()
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise ModelConfigError(f"GPTQ checkpoints are read in the gptq or gptq_v2 format, not {fmt!r}")
    return WeightQuant(method, bits, group, zero_point=bool(quant.get("zero_point", True)),
                       zeros_minus_one=fmt == "gptq")


# compressed-tensors' formats and their weights' types and sizes (its docs: "W4A16", "W8A8", "FP8")
_COMPRESSED = {"pack-quantized": ("int", (4, 8)), "int-quantized": ("int", (8,)), "float-quantized": ("float", (8,))}


def _compressed_tensors(quant: dict) -> WeightQuant:
    """compressed-tensors' config (llm-compressor's checkpoints, RedHatAI's W4A16, W8A8 and FP8-dynamic
    releases): one weight quantization for every group of targets; activations dynamic or none."""
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        raise ModelConfigError(f"compressed-tensors checkpoints are read compressed, not {status!r}")
    groups = list((quant.get("config_groups") or {}).values())
    weights = [g.get("weights") for g in groups]
    formats = {g.get("format") or quant.get("format") for g in groups}
    if not weights or None in weights or any(w != weights[0] for w in weights) or len(formats) != 1:
        raise ModelConfigError("compressed-tensors checkpoints are read with one weight quantization and format for "
                               "every group of their config_groups")
    for g in groups:
        for kind in ("input_activations", "output_activations"):
            if g.get(kind) and not g[kind].get("dynamic"):
                raise ModelConfigError(f"compressed-tensors checkpoints with static {kind} are not supported: only "
                                       "dynamic ones or none (the weights are dequantized at load)")
    (fmt,), w = formats, weights[0]
    kind, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if fmt not in _COMPRESSED or _COMPRESSED[fmt][0] != kind or bits not in _COMPRESSED[fmt][1]:
        raise ModelConfigError(f"compressed-tensors checkpoints are read as pack-quantized 4- or 8-bit integers, "
                               f"int-quantized int8 or float-quantized float8, not {fmt!r} {bits!r}-bit {kind!r}")
    if strategy not in ("tensor", "channel", "group", "block") or (strategy == "block" and kind != "float"):
        raise ModelConfigError(f"compressed-tensors weights are read with tensor, channel or group scales (and "
                               f"float8 with block ones), not {strategy!r}")
    if w.get("actorder") == "group":
        raise ModelConfigError("compressed-tensors weights in act-order groups (actorder: group) are not supported")
    group, block = w.get("group_size") or 0, w.get("block_structure")
    if strategy == "group" and not (isinstance(group, int) and group > 0):
        raise ModelConfigError(f"quantization_config's group_size must be a positive integer, got {group!r}")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                    and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelConfigError(f"quantization_config's block_structure must be two positive integers, got {block!r}")
    return WeightQuant("compressed-tensors", bits, group if strategy == "group" else 0,
                       zero_point=not w.get("symmetric", True), strategy=strategy,
                       block=tuple(block) if strategy == "block" else None, packed=fmt == "pack-quantized",
                       floats=kind == "float")


WEIGHT_QUANT = {"awq": _packed_ints, "gptq": _packed_ints, "compressed-tensors": _compressed_tensors}


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    return model_config_from_dict(_read_json(model_dir / "config.json", required=True),
                                  _read_json(model_dir / "generation_config.json", required=False))


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ModelConfigError(f"no {path.name} in {path.parent}")
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path} holds no JSON object")
    return raw


def long_rope_prompt(cfg: ModelConfig, prompt_len: int) -> bool:
    """Whether a prompt of `prompt_len` tokens (a resumed request's: the first attempt's) turns with
    LongRoPE's long factors at every position, as transformers turns a prompt longer than the
    pretraining length: its rows of rope_tables are its positions plus n_positions."""
    rope = cfg.rope
    return (rope is not None and rope.rope_type == "longrope" and cfg.n_positions > rope.original_max_positions
            and prompt_len > rope.original_max_positions)
