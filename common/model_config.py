"""The shape of a GPTBigCode model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("gpt_bigcode",)

# Names transformers' ACT2FN accepts for GPTBigCode checkpoints, mapped to our kernels.
ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


class ModelConfigError(ValueError):
    """A config.json that does not describe a model we can run."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    multi_query: bool
    activation: str  # one of ACTIVATIONS' values
    layer_norm_epsilon: float
    scale_attn_weights: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale_attn_weights else 1.0

    def num_params(self) -> int:
        e, i = self.n_embd, self.n_inner
        per_layer = 4 * e + (e + 1) * (e + 2 * self.kv_dim) + (e + 1) * e + (e + 1) * i + (i + 1) * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return (self.vocab_size + self.n_positions) * e + self.n_layer * per_layer + 2 * e + head

    def fingerprint(self, vocab_size: int) -> str:
        """Identifies the model shape and the tokenizer's vocabulary, so that processes can refuse a
        mismatched peer."""
        blob = json.dumps([asdict(self), vocab_size], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config_from_dict(raw: dict) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"unsupported model_type {model_type!r}: splitserve runs {', '.join(SUPPORTED_MODEL_TYPES)} "
            "checkpoints (SantaCoder, StarCoder and their relatives)"
        )
    if raw.get("add_cross_attention"):
        raise ModelConfigError("GPTBigCode with cross-attention is not supported")
    try:
        n_embd, n_head = int(raw["n_embd"]), int(raw["n_head"])
        activation = raw.get("activation_function", "gelu_pytorch_tanh")
        if activation not in ACTIVATIONS:
            raise ModelConfigError(
                f"unsupported activation_function {activation!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        if n_embd % n_head:
            raise ModelConfigError(f"n_embd ({n_embd}) is not divisible by n_head ({n_head})")
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            n_positions=int(raw["n_positions"]),
            n_embd=n_embd,
            n_layer=int(raw["n_layer"]),
            n_head=n_head,
            n_inner=int(raw.get("n_inner") or 4 * n_embd),
            multi_query=bool(raw.get("multi_query", True)),
            activation=ACTIVATIONS[activation],
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
        )
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks the field {e.args[0]!r}") from None


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    return model_config_from_dict(raw)
