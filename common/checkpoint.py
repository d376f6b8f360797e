"""Load and save model weights as safetensors, in the Hugging Face layout of each family.

Only safetensors are read: a pickle checkpoint (`pytorch_model.bin`) can run
arbitrary code when loaded. Tensors are read one at a time and converted to the
serving dtype and device at once, so the process never holds a second copy of
the model in the checkpoint's dtype.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import awq, compressed, fp8, gptq
from .families import checkpoint_shapes, family_of
from .memory import available_bytes
from .model_config import ModelConfig, WeightQuant

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"  # outside the base model's prefix in every family

# Below this a progress bar is noise; above it loading takes long enough to want one.
AUTO_PROGRESS_BYTES = 256 * 2**20

# Buffers some checkpoints store beside the weights, which we compute ourselves: GPTBigCode's
# causal masks, old Llama-shaped checkpoints' rotary frequencies.
_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias|layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# MXFP4's packed values and scales (gpt-oss's experts): read as stored, uint8, for the family to dequantize
PACKED = ("_blocks", "_scales")
QUANT_FORMATS = {"awq": awq, "gptq": gptq, "compressed-tensors": compressed}  # by quant_method
FP8_DTYPE = "F8_E4M3"  # safetensors' name of the float8 that FP8 checkpoints store (common/fp8.py)


class CheckpointError(ValueError):
    """A checkpoint directory we cannot load weights from."""


@dataclass(frozen=True)
class _Source:
    path: Path
    key: str  # the name as stored in the file
    # a quantized weight's other tensors by role: an FP8 weight's "scale" (common/fp8.py), an AWQ,
    # GPTQ or compressed-tensors weight's (its format's PARTS; the source itself is the part its
    # format's `main` names, or the weight stored as int8 or float8)
    parts: tuple[tuple[str, _Source], ...] = ()


def load_weights(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read the parameters of `config`'s model from `model_dir`, keyed by canonical name.

    Every file header is checked (names, shapes, dtypes) before any tensor data is
    read, so a bad checkpoint fails in seconds rather than after loading most of it.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"weights can only be loaded as a floating dtype, not {dtype}")
    files = _checkpoint_files(Path(model_dir))
    shapes = checkpoint_shapes(config)
    sources = _plan(files, shapes, config)
    _check_complete(Path(model_dir), shapes, sources)
    device = torch.device(device)
    # only a GPU: on the host a checkpoint in the serving dtype is mapped from the page cache, not copied
    if device.type == "cuda":
        check_fits(config, dtype, str(device), available_bytes(device))

    if progress is None:
        progress = sum(p.stat().st_size for p in files) > AUTO_PROGRESS_BYTES
    weights: dict[str, torch.Tensor] = {}
    with tqdm(total=len(sources), desc="loading weights", unit="tensor", file=sys.stderr, disable=not progress) as bar:
        for path in files:
            names = [name for name, src in sources.items() if src.path == path]
            if not names:
                continue
            with _open(path) as f:
                for name in names:
                    src = sources[name]
                    t = f.get_tensor(src.key)
                    if src.parts:  # in the same file, but for a rare shard boundary between them
                        parts = {role: (f.get_tensor(p.key) if p.path == path else _read(p)).to(device)
                                 for role, p in src.parts}
                        t = _dequantize(t.to(device), parts, config, dtype)
                    weights[name] = t.to(device=device, dtype=None if name.endswith(PACKED) else dtype)
                    bar.update()
    return {name: weights[name] for name in shapes}


def weights_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """The weights' size in the serving dtype (MXFP4's packed experts as stored: a lower bound)."""
    return sum(math.prod(shape) * (1 if name.endswith(PACKED) else dtype.itemsize)
               for name, shape in checkpoint_shapes(config).items())


def quantization(config: ModelConfig) -> str:
    """The quantized format the checkpoint stores its weights in ("FP8", "awq", ...), or ""."""
    return "FP8" if config.fp8 else config.weight_quant.method if config.weight_quant else ""


def check_fits(config: ModelConfig, dtype: torch.dtype, device: str, free: int) -> None:
    """Refuse, before a byte is read, weights that `free` bytes of `device` cannot hold: their size in
    the serving dtype (a quantized checkpoint's dequantized), not an out-of-memory error minutes into
    the load."""
    need = weights_bytes(config, dtype)
    if need > free:
        quant = quantization(config)
        why = f" (this {quant} checkpoint's weights are dequantized at load)" if quant else ""
        raise CheckpointError(f"the weights take {need / 2**30:.1f} GiB as {str(dtype).removeprefix('torch.')}{why}, "
                              f"more than the {free / 2**30:.1f} GiB free on {device}: serve them on a GPU with "
                              "more memory, in a smaller dtype, or serve a smaller model")


def save_weights(weights: dict[str, torch.Tensor], model_dir: str | Path, prefix: str,
                 max_shard_bytes: int | None = None) -> None:
    """Write canonical-named `weights` as a Hugging Face safetensors checkpoint, the base model's
    tensors under `prefix` (the family's: "transformer." for GPTBigCode).

    One `model.safetensors`, or when it would exceed `max_shard_bytes`, numbered
    shards plus `model.safetensors.index.json`. Checkpoint files of an earlier save
    in `model_dir` are removed first, as transformers does, so stale shards or a
    stale single file (which loaders prefer over an index) cannot shadow this save.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_checkpoint_files(model_dir)
    tensors = {(k if k == LM_HEAD else prefix + k): v.contiguous() for k, v in weights.items()}
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, model_dir / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, model_dir / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, filename)
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint, in shard order."""
    if not model_dir.exists():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} is not a directory")
    # transformers prefers the single file when both are present; so do we.
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    if (model_dir / INDEX_FILE).is_file():
        return _shards_from_index(model_dir / INDEX_FILE)
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = f" (found {', '.join(pickles)})" if pickles else ""
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{found}. Only safetensors checkpoints are "
        "loaded: .bin/pickle checkpoints can run arbitrary code when unpickled, so they are not "
        "loaded for safety. Convert once with safetensors, e.g. in Python: "
        "AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)"
    )


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path} names shard {shard.name}, which is missing from {shard.parent}")
    return shards


@contextmanager
def _open(path: Path) -> Iterator:
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def _dequantize(t: torch.Tensor, parts: dict[str, torch.Tensor], config: ModelConfig,
                dtype: torch.dtype) -> torch.Tensor:
    if config.weight_quant is not None:
        return QUANT_FORMATS[config.weight_quant.method].dequantize(t, parts, config.weight_quant, dtype)
    return fp8.dequantize(t, parts["scale"], config.fp8_block, dtype)


def _plan(files: list[Path], shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> dict[str, _Source]:
    """Find each expected tensor in the file headers and check its shape and dtype, under the
    family's prefix or one of several (a multimodal checkpoint's text model, as transformers 4 and 5
    name it). In an FP8 checkpoint a weight stored as FP8 takes the scales stored beside it; in an
    AWQ, GPTQ or compressed-tensors checkpoint a weight stored as its format's main part (or as int8
    or float8 in place) takes its scales and zero points.

    The files themselves are searched rather than trusting the index's weight_map,
    so a stale index can only cause a clear error, never a silently wrong tensor.
    """
    prefix = family_of(config.model_type).PREFIX
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    sources: dict[str, _Source] = {}
    parts: dict[str, dict[str, _Source]] = {}  # weight name -> its quantization's other tensors, by role
    quantized: set[str] = set()
    main, in_place = _main_part(config), _stored_quantized(config)
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                name = next((key.removeprefix(p) for p in prefixes if key.startswith(p)), key)
                part = _part_of(name, shapes, config)
                if part is not None:
                    weight, role = part
                    if config.weight_quant is not None:
                        _check_quant_part(f.get_slice(key), key, path, role, shapes[weight], config.weight_quant)
                    if role != main:
                        parts.setdefault(weight, {})[role] = _Source(path, key)
                        continue
                    name = weight
                    quantized.add(name)
                elif name not in shapes:
                    _note_ignored(name, key, path)
                    continue
                if name in sources:
                    raise CheckpointError(f"tensor {name} is stored twice: as {sources[name].key} and {key} in {path}")
                if part is None:
                    stored = _check_tensor(f.get_slice(key), key, path, shapes[name], packed=name.endswith(PACKED),
                                           quantized=in_place)
                    if stored in in_place:
                        quantized.add(name)
                sources[name] = _Source(path, key)
    for name in quantized:
        src, have = sources[name], parts.get(name, {})
        missing = [role for role in _needed(config, shapes[name]) if role not in have]
        if missing:
            beside = ", ".join(f"{src.key}{fp8.SCALE_SUFFIX}" if role == "scale"
                               else f"{src.key.rpartition('.')[0]}.{role}" for role in missing)
            what = config.weight_quant.method.upper() if config.weight_quant is not None else "FP8"
            raise CheckpointError(f"{what} tensor {src.key} in {src.path} has no {beside} beside it")
        sources[name] = replace(src, parts=tuple(sorted(have.items())))
    return sources


def _needed(config: ModelConfig, weight: tuple[int, ...]) -> list[str]:
    """The parts a quantized weight cannot do without."""
    quant = config.weight_quant
    if quant is None:
        return ["scale"]
    fmt = QUANT_FORMATS[quant.method]
    optional = fmt.optional(quant)
    return [role for role in fmt.part_shapes(*weight, quant) if role != _main_part(config) and role not in optional]


def _main_part(config: ModelConfig) -> str | None:
    """The part of a quantized weight stored in its place (AWQ's qweight, ...); None for FP8's."""
    quant = config.weight_quant
    return QUANT_FORMATS[quant.method].main(quant) if quant is not None else None


def _stored_quantized(config: ModelConfig) -> tuple[str, ...]:
    """The dtypes of weights stored quantized in place, scaled by their parts: FP8's float8, or the
    format's (compressed-tensors' int8 or float8)."""
    quant = config.weight_quant
    return (FP8_DTYPE,) if config.fp8 else QUANT_FORMATS[quant.method].in_place(quant) if quant else ()


def _part_of(name: str, shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> tuple[str, str] | None:
    """(the weight, its role) where the tensor `name` is part of a quantized weight, else None."""
    if config.fp8 and name.endswith(fp8.SCALE_SUFFIX) and name.removesuffix(fp8.SCALE_SUFFIX) in shapes:
        return name.removesuffix(fp8.SCALE_SUFFIX), "scale"
    base, _, role = name.rpartition(".")
    if config.weight_quant is not None and role in QUANT_FORMATS[config.weight_quant.method].PARTS \
            and f"{base}.weight" in shapes:
        return f"{base}.weight", role
    return None


def _check_quant_part(tensor_slice, key: str, path: Path, role: str, weight: tuple[int, ...],
                      quant: WeightQuant) -> None:
    """A part of an AWQ, GPTQ or compressed-tensors weight [O, I]: its shape (the format's
    part_shapes; one value where one is expected), integers but for the scales, floating point."""
    fmt, name = QUANT_FORMATS[quant.method], quant.method.upper()
    if len(weight) != 2 or not fmt.packs(*weight, quant):
        raise CheckpointError(f"tensor {key} in {path}: {name} packs {32 // quant.bits} values an int32, which the "
                              f"weight of {weight} from config.json does not divide into")
    expected = fmt.part_shapes(*weight, quant).get(role)
    shape, stored = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
    if shape != expected and not (expected == (1,) and shape == ()):
        raise CheckpointError(f"tensor {key} in {path} has shape {shape}, expected {expected} for the {role} of the "
                              f"{name} weight of {weight} (config.json's quantization_config)")
    floating = role.endswith(("scales", "scale"))
    if not (stored.startswith(("F", "BF")) if floating else stored.startswith(("I", "U"))):
        raise CheckpointError(f"tensor {key} in {path} has dtype {stored}: {name}'s {role} is "
                              f"{'floating point' if floating else 'integers'}")


def _read(src: _Source) -> torch.Tensor:
    with _open(src.path) as f:
        return f.get_tensor(src.key)


def _note_ignored(name: str, key: str, path: Path) -> None:
    # A tied lm_head and causal-mask buffers are expected leftovers; anything else may hint at a wrong model.
    if name != LM_HEAD and not _BUFFER.fullmatch(name):
        log.debug("ignoring unexpected tensor %s in %s", key, path)


def _check_tensor(tensor_slice, key: str, path: Path, expected: tuple[int, ...], packed: bool,
                  quantized: tuple[str, ...] = ()) -> str:
    """The tensor's stored dtype, once its shape and dtype are checked."""
    shape = tuple(tensor_slice.get_shape())
    if shape != expected:
        raise CheckpointError(f"tensor {key} in {path} has shape {shape}, expected {expected} from config.json")
    stored = tensor_slice.get_dtype()  # safetensors names: F32, F16, BF16, F8_E4M3, ..., I64, BOOL
    if packed:
        if stored != "U8":
            raise CheckpointError(f"tensor {key} in {path} has dtype {stored}; MXFP4 blocks and scales are U8")
    elif stored in quantized:  # scaled by its parts (_stored_quantized)
        return stored
    elif stored.startswith("F8"):
        raise CheckpointError(f"tensor {key} in {path} has dtype {stored}; FP8 weights are read as {FP8_DTYPE} of a "
                              "checkpoint whose config.json says so (quant_method fp8, or compressed-tensors' "
                              "float-quantized)")
    elif not (stored.startswith("F") or stored == "BF16"):
        raise CheckpointError(f"tensor {key} in {path} has dtype {stored}; weights must be floating point")
    return stored


def _check_complete(model_dir: Path, shapes: dict[str, tuple[int, ...]], sources: dict[str, _Source]) -> None:
    missing = [name for name in shapes if name not in sources]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"checkpoint in {model_dir} lacks {len(missing)} of {len(shapes)} tensors the config needs: {shown}"
        )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order; a tensor larger than max_bytes gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    return shards


def _remove_checkpoint_files(model_dir: Path) -> None:
    for p in model_dir.iterdir():
        if p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(p.name):
            p.unlink()
