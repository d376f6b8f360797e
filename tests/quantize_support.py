"""Quantized checkpoints made from a dense one as each format's own tools lay them out: FP8 as
Qwen3's releases, AWQ as AutoAWQ's GEMM layout, GPTQ as AutoGPTQ packs it, compressed-tensors by
compressed-tensors itself; each but FP8 with the dense weights a reference dequantizes beside it.
Imports torch and safetensors alone (compressed-tensors where it is used): the device image's
stand-in collects it (tests/test_cuda_quantized.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def fp8_quantize(path: Path, block: list[int] | None) -> None:
    """Rewrite a checkpoint as Qwen3's FP8 releases are laid out: every projection's weight float8
    (e4m3) with random scales per block of `block` [rows, columns] (None: one a weight, and the scales
    in a shard of their own) beside it, the config's quantization_config saying so; embeddings, norms
    and routers as they were."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(5)
    out = {}
    for key, w in load_file(path / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            out[key] = w
            continue
        grid = (1, 1) if block is None else (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
        scale = torch.rand(grid, generator=gen) * w.abs().max() / 200 + 1e-4
        full = scale.repeat_interleave(w.shape[0] if block is None else block[0], 0)[: w.shape[0]]
        full = full.repeat_interleave(w.shape[1] if block is None else block[1], 1)[:, : w.shape[1]]
        out[key] = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[key + "_scale_inv"] = scale.reshape(()) if block is None else scale
    if block is None:  # two shards: a weight's scale read from the other file
        (path / "model.safetensors").unlink()
        shards = {f"model-0000{i}-of-00002.safetensors":
                  {k: v for k, v in out.items() if k.endswith("_inv") == (i == 2)} for i in (1, 2)}
        for name, tensors in shards.items():
            save_file(tensors, path / name, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     **({"weight_block_size": block} if block else {})}
    (path / "config.json").write_text(json.dumps(config))


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held as int64 -> int32 with the same bits, as the formats store them."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """[R, C] values in 0..15 -> [R, C / 8] int32 as AutoAWQ packs them: nibble j of each int32 holds
    column 8c + [0, 2, 4, 6, 1, 3, 5, 7][j] (its packing order, for its GEMM kernel)."""
    nibbles = q.reshape(q.shape[0], -1, 8)[..., [0, 2, 4, 6, 1, 3, 5, 7]].to(torch.int64)
    packed = (nibbles << torch.arange(0, 32, 4)).sum(-1)
    return as_int32(packed)


def awq_quantize(path: Path, group: int, zero_point: bool, reference: bool = True) -> Path | None:
    """Rewrite a checkpoint as Qwen's AWQ releases are laid out (AutoAWQ's GEMM layout): every
    projection's weight 4-bit, in groups of `group` input columns with a scale each and a zero point
    (`zero_point`) or centred on 8, stored as qweight, qzeros and scales; embeddings, norms, biases
    and routers as they were. -> (where `reference`) a dense checkpoint of the dequantized weights
    beside it, as compressed-tensors makes them: its converter from AutoAWQ's layout, then its
    decompression."""
    from safetensors.torch import load_file, save_file

    dense_dir = shutil.copytree(path, path.parent / f"{path.name}-dense") if reference else None
    out = {}
    for key, w in load_file(path / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            out[key] = w
            continue
        rows, cols = w.shape
        groups = w.reshape(rows, cols // group, group)
        if zero_point:
            lo, hi = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
            scale = (hi - lo).clamp(min=1e-5) / 15
            zero = (-lo / scale).round()
        else:
            scale, zero = groups.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 7, torch.full_like(groups[..., :1], 8)
        q = ((groups / scale).round() + zero).clamp(0, 15).reshape(rows, cols)
        base = key.removesuffix(".weight")
        out[f"{base}.qweight"] = awq_pack(q.T)  # [I, O / 8]
        if zero_point:
            out[f"{base}.qzeros"] = awq_pack(zero.reshape(rows, -1).T)  # [I / G, O / 8]
        out[f"{base}.scales"] = scale.reshape(rows, -1).T.contiguous()  # [I / G, O]
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                                     "zero_point": zero_point}
    (path / "config.json").write_text(json.dumps(config))
    if dense_dir is None:
        return None
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    converter = AutoAWQConverter(bits=4, group_size=group, zero_point=zero_point)
    (scheme,) = converter.update_config(None).config_groups.values()
    converted = converter.process(dict(out))
    dense = {k: v for k, v in converted.items() if ".weight_" not in k}
    for key in [k for k in converted if k.endswith(".weight_packed")]:
        base = key.removesuffix(".weight_packed")
        module = {k.removeprefix(f"{base}."): v for k, v in converted.items() if k.startswith(f"{base}.weight_")}
        dense[f"{base}.weight"] = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    return dense_dir


def gptq_pack(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Values in 0..2^bits - 1 -> int32, 32 / bits values each along `dim` (0: rows, 1: columns), the
    first in the lowest bits: as AutoGPTQ's QuantLinear.pack writes qweight (along the input rows)
    and qzeros (along the output columns)."""
    per = 32 // bits
    shifts = bits * torch.arange(per, dtype=torch.int64)
    if dim == 0:
        packed = (q.reshape(-1, per, q.shape[1]).to(torch.int64) << shifts.view(1, per, 1)).sum(1)
    else:
        packed = (q.reshape(q.shape[0], -1, per).to(torch.int64) << shifts).sum(-1)
    return as_int32(packed)


def gptq_quantize(path: Path, bits: int, group: int, act_order: bool, v2: bool) -> Path:
    """Rewrite a checkpoint as Qwen's GPTQ releases are laid out: every projection's weight as
    `bits`-bit integers with a scale and a zero point per group of `group` input rows (-1: one group;
    `act_order`: the rows of a group scattered, as desc_act leaves them, named by g_idx), stored as
    qweight, qzeros (one less than the zero, but in GPTQModel's `v2` format), scales and g_idx.
    -> a dense checkpoint of the weights those integers stand for, (q - z) * s, beside it."""
    from safetensors.torch import load_file, save_file

    dense_dir = shutil.copytree(path, path.parent / f"{path.name}-dense")
    gen, top = torch.Generator().manual_seed(7), 2**bits - 1
    out, dense = {}, {}
    for key, w in load_file(path / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            out[key] = dense[key] = w
            continue
        wt = w.T  # [I, O]
        inputs = wt.shape[0]
        size = group if group > 0 else inputs
        order = torch.randperm(inputs, generator=gen) if act_order else torch.arange(inputs)
        g_idx = (order // size).to(torch.int32)  # row i is in group g_idx[i]
        groups = -(-inputs // size)
        lo = torch.stack([wt[g_idx == g].amin(0) for g in range(groups)]).clamp(max=0)  # [groups, O]
        hi = torch.stack([wt[g_idx == g].amax(0) for g in range(groups)]).clamp(min=0)
        scale = (hi - lo).clamp(min=1e-5) / top
        # AutoGPTQ's format cannot store a zero of 0 (one less is -1, which its packing spills into the
        # next values): its zeros are 1 at least, as a symmetric checkpoint's (2^(bits - 1)) are
        zero = (-lo / scale).round().clamp(0 if v2 else 1, top)
        rows = g_idx.long()
        q = ((wt / scale[rows]).round() + zero[rows]).clamp(0, top)
        dense[key] = ((q - zero[rows]) * scale[rows]).T.contiguous()
        base = key.removesuffix(".weight")
        out[f"{base}.qweight"] = gptq_pack(q, bits, 0)  # [I * bits / 32, O]
        out[f"{base}.qzeros"] = gptq_pack(zero - (0 if v2 else 1), bits, 1)  # [groups, O * bits / 32]
        out[f"{base}.scales"] = scale
        out[f"{base}.g_idx"] = g_idx
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
                                     "sym": False, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    (path / "config.json").write_text(json.dumps(config))
    return dense_dir


def observed(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight's min and max per scale of `args`' strategy, as compressed-tensors' observers give them."""
    if args.strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        groups = w.reshape(w.shape[0], -1, args.group_size)
        return groups.amin(-1), groups.amax(-1)
    rows, cols = args.block_structure
    blocks = w.reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols)
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def compressed_tensors_quantize(path: Path, fmt: str, weights: dict, activations: dict | None,
                                keep_zeros: bool = False) -> Path:
    """Rewrite a checkpoint as llm-compressor writes one in compressed-tensors' `fmt` (RedHatAI's W4A16,
    W8A8 and FP8-dynamic releases): every projection quantized by compressed-tensors itself with the
    `weights` arguments, its scales and zero points from the weight's own min and max (`keep_zeros`:
    a symmetric weight's zero points stored too, as older llm-compressor wrote W8A8); embeddings,
    norms, biases and routers as they were. -> a dense checkpoint beside it of the weights
    compressed-tensors decompresses."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    dense_dir = shutil.copytree(path, path.parent / f"{path.name}-dense")
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    kept = set(compressor.compression_param_names(scheme)) | {"weight"}
    out, dense = {}, {}
    for key, w in load_file(path / "model.safetensors").items():
        if not key.endswith("proj.weight"):
            out[key] = dense[key] = w
            continue
        scale, zero = calculate_qparams(*observed(w, args), args)
        stored = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme)
        base = key.removesuffix(".weight")
        out |= {f"{base}.{name}": t for name, t in stored.items() if name in kept}
        if keep_zeros:
            out[f"{base}.weight_zero_point"] = zero
        dense[key] = compressor.decompress(dict(stored), scheme)["weight"]
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json"),
                                      "input_activations": activations, "output_activations": None, "format": fmt}}}
    (path / "config.json").write_text(json.dumps(config))
    return dense_dir


DYNAMIC = {"int": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True},
           "float": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}}
