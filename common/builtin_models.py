"""Built-in models, so that splitserve runs with no network and no flags.

`tiny`, the default, is a small GPTBigCode multi-query model (the benchmarks' reference shape)
trained on the standard library's Python source (`splitserve train-tiny`) and shipped inside the
package as an ordinary Hugging Face checkpoint in fp16, with its model card. `tiny-random` has
the same shape with weights from a fixed seed, made on first use under
`$SPLITSERVE_HOME/models/` in fp32: exact-equality tests use it, where a trained model's near-ties
would make token-for-token comparisons fragile.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .hub import fetch_checkpoint, is_repo_id

# Bump when the recipe (TINY_HF_CONFIG, RANDOM_SEED, random_checkpoint.py) changes, so existing caches are rebuilt instead of reused.
RECIPE_VERSION = 1
MARKER = "splitserve-builtin.json"

TINY_HF_CONFIG = {
    "architectures": ["GPTBigCodeForCausalLM"],
    "model_type": "gpt_bigcode",
    "vocab_size": 8192,
    "n_positions": 2048,
    "n_embd": 256,
    "n_layer": 4,
    "n_head": 8,
    "n_inner": None,
    "multi_query": True,
    "activation_function": "gelu_pytorch_tanh",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "attention_softmax_in_fp32": True,
    "scale_attention_softmax_in_fp32": True,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

RANDOM_SEED = 20231125
SHIPPED_TINY = Path(__file__).parent / "builtin" / "tiny"
BUILTIN_MODELS = ("tiny", "tiny-random")


def default_home() -> Path:
    return Path(os.environ.get("SPLITSERVE_HOME") or Path.home() / ".cache" / "splitserve")


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def resolve_model(name_or_dir: str, home: Path | None = None, progress: bool = True,
                  revision: str | None = None, weights: bool = True) -> Path:
    """A built-in name becomes its checkpoint directory (created if needed); a directory is taken as
    it is; a Hugging Face Hub repository id (owner/name) its snapshot at `revision`, fetched where
    missing, its weights too unless `weights` is False (hub.py)."""
    if name_or_dir == "tiny":
        return SHIPPED_TINY
    if name_or_dir == "tiny-random":
        return ensure_builtin(name_or_dir, home or default_home(), progress)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if is_repo_id(name_or_dir):
        return fetch_checkpoint(name_or_dir, revision, weights)
    raise FileNotFoundError(
        f"model {name_or_dir!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), an existing "
        "directory nor a Hugging Face Hub repository id (owner/name)"
    )


def ensure_builtin(name: str, home: Path, progress: bool = True) -> Path:
    target = home / "models" / name
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent creator never leaves
    # a half-written checkpoint where loaders look.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    # Making weights needs torch, which resolving a name must not import: the gateway runs without it.
    from .random_checkpoint import write_random_checkpoint

    try:
        write_random_checkpoint(tmp, TINY_HF_CONFIG, RANDOM_SEED, progress)
        (tmp / MARKER).write_text(json.dumps({"name": name, "recipe": RECIPE_VERSION}))
        if target.exists() and not _is_current(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_current(target):  # not a concurrent creator's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("recipe") == RECIPE_VERSION
    except (OSError, ValueError):
        return False
