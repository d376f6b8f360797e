"""The safetensors checkpoint loader against checkpoints written by transformers and by us."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from splitserve.common.checkpoint import CheckpointError, check_fits, load_weights, quantization, save_weights
from splitserve.common.model_config import WeightQuant, load_model_config

torch.set_num_threads(1)


def tiny_model(multi_query=True, tie=True) -> GPTBigCodeForCausalLM:
    torch.manual_seed(0)
    config = GPTBigCodeConfig(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, multi_query=multi_query,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )
    return GPTBigCodeForCausalLM(config).eval()


def canonical_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters under our names; a tied lm_head is wte and not ours to return."""
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def saved(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def load(path: Path, dtype=torch.float32, **kwargs) -> dict[str, torch.Tensor]:
    return load_weights(path, load_model_config(path), dtype, **kwargs)


def assert_same(loaded: dict, expected: dict, dtype=torch.float32):
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == dtype, name
        assert torch.equal(loaded[name], tensor.to(dtype)), name


@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loads_transformers_checkpoint(tmp_path, multi_query, dtype):
    model = tiny_model(multi_query)
    assert_same(load(saved(model, tmp_path), dtype), canonical_state(model), dtype)


def test_untied_lm_head_is_loaded(tmp_path):
    model = tiny_model(tie=False)
    weights = load(saved(model, tmp_path))
    assert "lm_head.weight" in weights
    assert_same(weights, canonical_state(model))


def test_sharded_transformers_checkpoint(tmp_path):
    model = tiny_model()
    saved(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert_same(load(tmp_path), canonical_state(model))


@pytest.mark.parametrize("tie", [True, False])
def test_save_weights_round_trip_through_transformers(tmp_path, tie):
    model = tiny_model(multi_query=False, tie=tie)
    model.config.save_pretrained(tmp_path)
    save_weights(canonical_state(model), tmp_path, "transformer.", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tie)
    assert_same(load(tmp_path), canonical_state(model))

    reloaded, info = GPTBigCodeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    assert list(reloaded.state_dict()) == list(expected)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_save_weights_replaces_earlier_shards(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    save_weights(canonical_state(model), tmp_path, "transformer.", max_shard_bytes=20_000)
    save_weights(canonical_state(model), tmp_path, "transformer.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same(load(tmp_path), canonical_state(model))


def test_unprefixed_names_and_leftover_tensors(tmp_path, caplog):
    """Names without `transformer.`, mask buffers, a tied lm_head of any shape and strays are all fine."""
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    tensors = {k: v.contiguous() for k, v in canonical_state(model).items()}
    tensors |= {
        "h.0.attn.bias": torch.ones(64, 64, dtype=torch.bool),
        "h.0.attn.masked_bias": torch.tensor(-1e4),
        "lm_head.weight": torch.zeros(3),  # tied: never read, so its shape does not matter
        "score.weight": torch.zeros(2, 32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with caplog.at_level(logging.DEBUG, logger="splitserve.common.checkpoint"):
        assert_same(load(tmp_path), canonical_state(model))
    assert "score.weight" in caplog.text
    assert "attn.bias" not in caplog.text and "lm_head" not in caplog.text


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    load(saved(tiny_model(), tmp_path), progress=True)
    assert "loading weights" in capsys.readouterr().err
    load(tmp_path)  # tiny: no bar unless asked
    assert "loading weights" not in capsys.readouterr().err


# --- bad checkpoints ---------------------------------------------------------------------------------


def expect_error(path: Path, *words: str, config_from: Path | None = None):
    config = load_model_config(config_from or path)
    with pytest.raises(CheckpointError) as err:
        load_weights(path, config, torch.float32)
    for word in words:
        assert word in str(err.value)
    return err.value


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    saved(tiny_model(), tmp_path / "good")
    expect_error(tmp_path / "nope", "does not exist", str(tmp_path / "nope"), config_from=tmp_path / "good")


def test_directory_without_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    expect_error(tmp_path, "model.safetensors", "pickle", "safetensors")


def test_pickle_checkpoint_is_refused(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    expect_error(tmp_path, "pytorch_model.bin", "pickle", "safety")


def test_index_naming_missing_shard(tmp_path):
    saved(tiny_model(), tmp_path, max_shard_size="20KB")
    (tmp_path / "model-00002-of-00007.safetensors").unlink()
    expect_error(tmp_path, "model-00002-of-00007.safetensors", "missing")


def test_invalid_index(tmp_path):
    saved(tiny_model(), tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    expect_error(tmp_path, "model.safetensors.index.json", "not a valid")


def test_missing_tensor(tmp_path):
    saved(tiny_model(), tmp_path)
    rewrite(tmp_path / "model.safetensors", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    expect_error(tmp_path, "lacks 1 ", "h.1.mlp.c_fc.bias")


def test_missing_untied_lm_head(tmp_path):
    saved(tiny_model(tie=False), tmp_path)
    rewrite(tmp_path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    expect_error(tmp_path, "lm_head.weight")


def test_misshaped_tensor(tmp_path):
    """A multi-head checkpoint read with a multi-query config: c_attn is too tall."""
    saved(tiny_model(multi_query=False), tmp_path / "mha")
    saved(tiny_model(multi_query=True), tmp_path / "mqa")
    expect_error(tmp_path / "mha", "attn.c_attn", "(96", "expected (48", config_from=tmp_path / "mqa")


def test_integer_tensor(tmp_path):
    saved(tiny_model(), tmp_path)
    int_bias = {"transformer.ln_f.bias": torch.zeros(32, dtype=torch.int32)}
    rewrite(tmp_path / "model.safetensors", lambda t: t.update(int_bias))
    expect_error(tmp_path, "transformer.ln_f.bias", "I32", "floating")


def test_truncated_file(tmp_path):
    saved(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(tmp_path, str(path), "corrupt or truncated")


def test_garbage_file(tmp_path):
    saved(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 5)
    expect_error(tmp_path, "model.safetensors", "corrupt or truncated")


def test_weights_a_gpu_cannot_hold_are_refused_before_the_load(tiny_dir):
    """On a GPU the load first weighs the weights in the serving dtype (a quantized checkpoint's
    dequantized) against the free memory: a clear error, not an out-of-memory error minutes in."""
    cfg = load_model_config(tiny_dir)
    size = sum(p.numel() for p in load_weights(tiny_dir, cfg, torch.float32).values())
    check_fits(cfg, torch.bfloat16, "cuda:0", free=2 * size)
    with pytest.raises(CheckpointError, match=rf"take {2 * size / 2**30:.1f} GiB as bfloat16, more than the "
                                              r"0\.0 GiB free on cuda:1: serve them on a GPU with more memory"):
        check_fits(cfg, torch.bfloat16, "cuda:1", free=2 * size - 1)
    awq = replace(cfg, weight_quant=WeightQuant("awq", 4, 128))
    with pytest.raises(CheckpointError, match=r"as float16 \(this awq checkpoint's weights are dequantized at load\)"):
        check_fits(awq, torch.float16, "cuda:0", free=1)


def test_a_process_says_what_it_loaded_and_its_size(tiny_dir, caplog):
    """Each process that loads a model logs what, how (a quantized format dequantized), where, how
    long it took and the weights' size: what an operator sizes a GPU by."""
    from conftest import TEST_THREADS
    from splitserve.common.config import ModelOptions
    from splitserve.runtime_setup import open_model

    with caplog.at_level(logging.INFO, "splitserve.runtime_setup"):
        open_model(ModelOptions(str(tiny_dir), "float32", "cpu", TEST_THREADS, tiny_dir.parent, None))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "splitserve.runtime_setup"]
    assert line.startswith(f"loaded {tiny_dir} (gpt_bigcode) as float32 on cpu in ") and line.endswith(" GiB of weights")
    cfg = load_model_config(tiny_dir)
    assert quantization(cfg) == "" and quantization(replace(cfg, fp8=True)) == "FP8"
    assert quantization(replace(cfg, weight_quant=WeightQuant("gptq", 4, 128))) == "gptq"
