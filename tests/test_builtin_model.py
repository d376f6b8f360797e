"""The built-in tiny-random model: made once from a fixed seed, a normal Hugging Face checkpoint."""

from __future__ import annotations

import subprocess
import sys

import torch

from splitserve.common.builtin_models import TINY_HF_CONFIG, resolve_model
from splitserve.common.checkpoint import load_weights
from splitserve.common.model_config import load_model_config


def test_tiny_has_the_reference_shape(tiny_dir):
    cfg = load_model_config(tiny_dir)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_positions) == (4, 256, 8, 8192, 2048)
    assert cfg.multi_query


def test_second_call_reuses_the_checkpoint(tiny_dir, home):
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-random", home) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_weights_are_the_same_on_every_creation(tiny_dir, tmp_path):
    again = resolve_model("tiny-random", tmp_path, progress=False)
    cfg = load_model_config(tiny_dir)
    a = load_weights(tiny_dir, cfg, torch.float32)
    b = load_weights(again, cfg, torch.float32)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_loads_it(tiny_dir):
    from transformers import AutoTokenizer, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(tiny_dir)
    assert model.config.n_embd == TINY_HF_CONFIG["n_embd"]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]) == [0, 1, 2, 3]


def test_model_path_command_prints_the_directory(tiny_dir, home):
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "model-path", "tiny-random", "--home", str(home)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tiny_dir)


def test_unknown_model_gets_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "model-path", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "neither a built-in model" in out.stderr
