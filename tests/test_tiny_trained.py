"""The shipped `tiny` model (trained on the standard library) and `splitserve train-tiny`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from cluster import Cluster
from conftest import hf_model, load_cpu
from splitserve.common.attention import sdpa_prefill
from splitserve.common.builtin_models import SHIPPED_TINY, resolve_model
from splitserve.common.model import prefill

ROOT = Path(__file__).resolve().parents[1]
# The README's first-run examples: a curl command, then the server's answer.
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\s*```bash\n(.*?)```\s*```json\n(.*?)```", re.S)
TARGET_NATS = 5.2


def readme_examples() -> list[tuple[str, str, dict, dict]]:
    """(name, route, request body, expected answer) of each marked README example."""
    out = []
    for name, command, answer in EXAMPLE.findall((ROOT / "README.md").read_text()):
        route = re.search(r"127\.0\.0\.1:8080(/\S*)", command).group(1)
        body = re.search(r"-d '(.*?)'\s*$", command.replace("\\\n", " "), re.S).group(1)
        out.append((name, route, json.loads(body), json.loads(answer)))
    return out


def test_tiny_is_the_shipped_checkpoint_small_and_fp16():
    path = resolve_model("tiny")
    assert path == SHIPPED_TINY
    weights = path / "model.safetensors"
    assert weights.stat().st_size < 12 * 2**20
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    lm = load_cpu(path)
    assert lm.dtype == torch.float32  # computed in fp32 on the CPU by default


@torch.inference_mode()
def test_shipped_tiny_matches_transformers():
    path = resolve_model("tiny")
    lm = load_cpu(path)
    ids = torch.tensor(lm.tokenizer.encode("import os\n\ndef main():\n    print("))
    n = len(ids)
    ours = prefill(lm.weights, ids, torch.arange(n), [n], sdpa_prefill, logit_index=torch.arange(n))
    assert (ours - hf_model(path)(ids[None]).logits[0]).abs().max() <= 1e-4


def test_model_card_reports_the_held_out_loss_under_target():
    record = json.loads((SHIPPED_TINY / "training.json").read_text())["result"]
    assert record["unseen_loss"] <= TARGET_NATS < record["random_unseen_loss"]
    card = (SHIPPED_TINY / "README.md").read_text()
    assert f"{record['unseen_loss']:.3f}" in card and f"--steps {record['steps']}" in card


def test_readme_completions_are_the_servers_greedy_outputs(home):
    examples = readme_examples()
    assert {name for name, *_ in examples} >= {"generate", "fim"}
    with Cluster(home, model="tiny") as c, httpx.Client(base_url=c.url, timeout=120) as http:
        c.start_pipeline(4)
        for name, route, body, expected in examples:
            got = http.post(route, json=body).json()
            if "choices" in expected:
                assert got["choices"][0]["text"] == expected["choices"][0]["text"], name
            else:
                assert got == expected, name


def _train(out: Path) -> None:
    args = ["--steps", "6", "--max-files", "8", "--seq-len", "64", "--batch", "4", "--warmup-steps", "2",
            "--eval-every", "3", "--eval-windows", "2", "--threads", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", "splitserve.cli", "train-tiny", *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.timeout(900)
def test_a_short_training_run_is_deterministic_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a)
    _train(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    record = json.loads((a / "training.json").read_text())
    history = record["result"]["history"]
    assert [h["step"] for h in history] == [3, 6] and history[-1]["train_loss"] < 9.0
    assert "Reproduce" in (a / "README.md").read_text()
    lm = load_cpu(a)
    assert lm.cfg.n_embd == 256 and lm.tokenizer.encode("<fim_prefix>") == [1]
