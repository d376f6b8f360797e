"""`--model owner/name`: a Hugging Face Hub repository, read from the Hub's cache (laid out here as
huggingface_hub lays it out, with the tiny-random checkpoint; HF_HUB_OFFLINE keeps every test off the
network). `serve` resolves it once and its processes read that commit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from cluster import http_port, offline, serve_process
from splitserve.common.loading import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch) -> Path:
    """A Hub cache holding acme/tiny at two commits, main the newer; the environment reads it offline."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    for commit in (COMMIT, OLDER):
        shutil.copytree(tiny_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("splitserve-*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def model_path(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitserve.cli", "model-path", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def test_a_repository_id_resolves_to_its_snapshot_in_the_cache(hub_cache):
    assert model_path("acme/tiny").stdout.strip() == str(hub_cache / "snapshots" / COMMIT)
    assert model_path("acme/tiny", "--revision", OLDER).stdout.strip() == str(hub_cache / "snapshots" / OLDER)
    missing = model_path("acme/nothere")
    assert missing.returncode != 0 and "'acme/nothere' is not in the Hugging Face cache" in missing.stderr
    neither = model_path("./no/such/dir")
    assert neither.returncode != 0 and "nor a Hugging Face Hub repository id (owner/name)" in neither.stderr


def test_model_path_fetches_what_the_environment_names(hub_cache, monkeypatch):
    """A Kubernetes init container fetches what its pod's process serves: both read SPLITSERVE_MODEL
    and SPLITSERVE_REVISION (deploy/k8s/components/hub)."""
    monkeypatch.setenv("SPLITSERVE_MODEL", "acme/tiny")
    monkeypatch.setenv("SPLITSERVE_REVISION", OLDER)
    for args in ((), ("--no-weights",)):
        run = model_path(*args)
        assert run.stdout.strip() == str(hub_cache / "snapshots" / OLDER), run.stderr


def test_serve_answers_on_a_repository_by_its_id(hub_cache, home):
    lm = load_model(hub_cache / "snapshots" / COMMIT, torch.float32, torch.device("cpu"))
    spec = {"prompt": "def fib(n):", "max_new_tokens": 8, "ignore_eos": True}
    with serve_process(home, "--model", "acme/tiny") as (_, lines):
        url = f"http://127.0.0.1:{http_port(lines)}"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]] == ["acme/tiny"]
        body = {"inputs": spec["prompt"], "parameters": {"max_new_tokens": 8, "details": True}}
        answer = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        assert [t["id"] for t in answer["details"]["tokens"]] == offline(lm, [spec])[0]
