"""The engine benchmark runs end to end: `splitserve bench engine --quick` on the tiny model writes
its JSON and plot (the device pass's benchmark stages run on the CPU in test_device_pass.py); its
model over transformers' own tensors reads a mixture's experts as transformers holds them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_THREADS

ROW_TYPES = {"system": str, "phase": str, "batch_size": int, "prompt_len": int, "key_len": int, "new_tokens": int,
             "ms": float, "floor_ms": float, "peak_mem_mb": float}


def test_quick_engine_bench_writes_json_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "x.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "engine", "--quick", "--model", "tiny-random",
           "--threads", str(TEST_THREADS), "--json", str(out), "--plot-dir", str(tmp_path), "--batch-sizes", "1,2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout

    doc = json.loads(out.read_text())
    assert set(doc) == {"device", "model", "dtype", "threads", "results"}
    assert doc["device"].startswith("cpu (1 threads") and doc["dtype"] == "float32" and doc["threads"] == 1
    for row in doc["results"]:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["system"] in ("splitserve", "transformers") and row["phase"] in ("decode", "prefill")
        assert row["ms"] > 0 and row["floor_ms"] > 0 and row["peak_mem_mb"] > 0

    decode = {(r["system"], r["batch_size"]) for r in doc["results"] if r["phase"] == "decode"}
    assert {(s, b) for s in ("splitserve", "transformers") for b in (1, 2)} <= decode
    mixed = [r for r in doc["results"] if r.get("label") == "mixed-8"]
    assert len(mixed) == 2 and all(r["prompt_len"] == 2080 and r["batch_size"] == 8 for r in mixed)
    assert (tmp_path / "x.png").stat().st_size > 0



@pytest.mark.parametrize("model_type, fields", [
    ("mixtral", dict(intermediate_size=32, num_local_experts=4)),
    ("qwen3_moe", dict(intermediate_size=96, moe_intermediate_size=32, head_dim=16, num_experts=4)),
    ("deepseek_v2", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, first_k_dense_replace=1,
                         num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=8)),
])
def test_the_bench_reads_transformers_experts_as_they_are_in_memory(model_type, fields):
    """transformers 5 holds a mixture's experts fused, under names of its own; the benchmark runs our
    forward over those very tensors (model_over), and gets transformers' logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from splitserve.bench.engine_runs import model_over
    from splitserve.common.attention import sdpa_prefill
    from splitserve.common.model import prefill
    from splitserve.common.tokenizer import TINY_TOKENIZER_PATH, Tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=8192, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_experts_per_tok=2, **{"num_key_value_heads": 2, **fields})
    hf = AutoModelForCausalLM.from_config(config).eval()
    model = model_over(hf, Path(model_type), Tokenizer.from_file(TINY_TOKENIZER_PATH), torch.device("cpu"),
                       torch.float32)
    ids = torch.randint(3, 8192, (20,))
    with torch.inference_mode():
        ours = prefill(model.weights, ids, torch.arange(20), [20], sdpa_prefill, logit_index=torch.arange(20))
        torch.testing.assert_close(ours, hf(ids[None]).logits[0], rtol=0, atol=1e-5)
