"""The device pass (bench/gpu/device_pass.sh), rehearsed on the CPU the way a freshly lent GPU machine
runs it, so that its run there is its first real run, not its first run at all: a Python that sees
only the packages of the device image (bench/gpu/image-packages.txt), the carried wheels
(wheels.txt) installed by the wrapper's own pip command, the project installed by its own, then
every stage on the tiny shapes. A package the pass imports that neither the image nor the wheels
hold fails here first."""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import TEST_THREADS, load_cpu

ROOT = Path(__file__).parents[1]
GPU = ROOT / "bench" / "gpu"
sys.path.insert(0, str(GPU))  # the device pass's scripts import each other as siblings


def script(name: str):
    """A module of bench/gpu/ (scripts, not a package: static tools don't follow sys.path)."""
    return importlib.import_module(name)


OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what the device tool brings back from $OUT


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> set[str]:
    """The distribution names of a list: one a line, pins allowed, `#` comments."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return {normalize(re.split(r"[=<>!~;\s]", line)[0]) for line in lines if line and not line.startswith("#")}


SITE = Path(sysconfig.get_paths()["purelib"])  # this Python's packages, the stand-in's source


def installed(names: set[str]) -> list[importlib.metadata.Distribution]:
    return [d for d in importlib.metadata.distributions(path=[str(SITE)]) if normalize(d.metadata["Name"]) in names]


def with_requirements(names: set[str]) -> set[str]:
    """Those distributions and, as installed here, what they require: this Python's versions of
    them may need others than the image's versions do (huggingface-hub 2 needs httpx2)."""
    from packaging.requirements import Requirement

    found, todo = set(), set(names)
    while todo:
        name = todo.pop()
        found.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.add(normalize(req.name))
        todo -= found
    return found


def image_view(folder: Path) -> Path:
    """A folder of links to this Python's copies of the image's distributions and their
    requirements, and nothing else."""
    folder.mkdir()
    for dist in installed(with_requirements(listed(GPU / "image-packages.txt"))):
        for top in {f.parts[0] for f in dist.files or ()}:
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and (SITE / top).exists():
                if not (folder / top).exists():
                    (folder / top).symlink_to(SITE / top)
    return folder


def repacked_wheel(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """The wheel `pip download` would give for this Python, rebuilt from the installed files."""
    files = [f for f in dist.files if f.parts[0] != ".." and "__pycache__" not in f.parts]
    info = next(f.parent for f in files if f.name == "WHEEL" and f.parent.name.endswith(".dist-info"))
    tag = next(line.split(":", 1)[1].strip() for line in (SITE / info / "WHEEL").read_text().splitlines()
               if line.startswith("Tag:"))
    path = out / f"{normalize(dist.metadata['Name']).replace('-', '_')}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            if f.parent == info and f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = (SITE / f).read_bytes()
            z.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        z.writestr(f"{info.as_posix()}/RECORD", "\n".join(record + [f"{info.as_posix()}/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def device_image(tmp_path_factory) -> dict[str, str]:
    """device_pass.sh's PY, WHEELS and SITE for a stand-in of the device machine: a fresh virtual
    environment (no system packages) that sees the image's distributions alone, the carried
    wheels (for this Python), and an empty folder for pip --target."""
    tmp = tmp_path_factory.mktemp("device-image")
    view = image_view(tmp / "image")
    venv.create(tmp / "python", with_pip=False, symlinks=True)
    python = tmp / "python" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "device-image.pth").write_text(f"{view}\n")
    wheels = tmp / "wheels"
    wheels.mkdir()
    carried = installed(listed(GPU / "wheels.txt"))
    assert {normalize(d.metadata["Name"]) for d in carried} == listed(GPU / "wheels.txt"), "install them here first"
    for dist in carried:
        repacked_wheel(dist, wheels)
    return dict(PY=str(python), WHEELS=str(wheels), SITE=str(tmp / "site"))


def run_pass(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess,
                                                                                              Path]:
    out = tmp_path / "out"
    env = dict(os.environ, **env, OUT=str(out), SPLITSERVE_HOME=str(tmp_path / "home"),
               OMP_NUM_THREADS=str(TEST_THREADS))
    for name in ("PYTHONPATH", "DEVICE_PASS_T0"):
        env.pop(name, None)
    cmd = ["bash", str(GPU / "device_pass.sh"), "--device", "cpu", "--tiny", "--threads", str(TEST_THREADS), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env), out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "device-pass.jsonl").read_text().splitlines()]


def test_every_stage_runs_on_the_cpu_in_a_stand_in_for_the_device_image(device_image, tmp_path):
    done, out = run_pass(tmp_path, device_image)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    got = records(out)
    stages = {r["stage"]: r["status"] for r in got if r["item"] == "stage"}
    assert stages == dict.fromkeys(("setup", "correctness", "santacoder", "qwen7b"), "ok")

    # setup: the stand-in's own packages, and the carried ones from the wheels
    env = next(r for r in got if r["item"] == "env")
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["cuda_available"] is False
    assert env["msgspec"] and env["pyzmq"] and env["transformers"] and env["prefill_attention"] == "sdpa"
    assert next(r for r in got if r["item"] == "imports")["status"] == "passed"
    assert list(Path(device_image["SITE"]).glob("msgspec")) and list(Path(device_image["SITE"]).glob("zmq"))

    # correctness: what needs CUDA skips, the CPU twins pass, every listed check was found
    tests = {r["item"]: r for r in got if r["stage"] == "correctness" and r["item"].startswith("tests/")}
    assert all(any(item.startswith(node) for item in tests) for node in script("device_pass").CORRECTNESS)
    assert {r["status"] for r in tests.values()} == {"passed", "skipped"}
    assert all(r["reason"] in ("needs CUDA", "needs two GPUs") for r in tests.values() if r["status"] == "skipped")
    twins = {item.split("::")[1]: r for item, r in tests.items() if r["status"] == "passed"}
    assert {"test_padded_logits_equal_the_exact_ones[llama-gqa]", "test_padded_logits_equal_the_exact_ones[qwen3-moe-tiny]",
            "test_padded_logits_equal_the_exact_ones[deepseek-v2-tiny]",
            "test_padded_logits_equal_the_exact_ones[phi3-tiny]", "test_padded_logits_equal_the_exact_ones[glm4-tiny]",
            "test_padded_logits_equal_the_exact_ones[gemma2-tiny]",
            "test_padded_logits_equal_the_exact_ones[gemma3-tiny]",
            "test_padded_logits_equal_the_exact_ones[ministral3-tiny]",
            "test_padded_logits_equal_the_exact_ones[gpt-oss-tiny]",
            "test_padded_logits_equal_the_exact_ones[starcoder2-tiny]",
            "test_padded_static_step_gives_the_exact_steps_tokens", "test_a_decode_step_syncs_with_the_host_once[eager-tiny]",
            "test_kv_handoff_of_a_1024_token_prompt[shm]"} <= twins.keys()
    for family in ("tiny", "qwen3-moe-tiny", "deepseek-v2-tiny"):
        syncs = twins[f"test_a_decode_step_syncs_with_the_host_once[eager-{family}]"]
        assert syncs["host_reads"] == syncs["steps"] == 5
    handoff = twins["test_kv_handoff_of_a_1024_token_prompt[shm]"]
    assert handoff["bytes_equal"] is True and handoff["copy_ms"] > 0 and handoff["mib"] == 12.0

    # the benchmarks: every point measured, graphs as the CPU twin, targets computed but not judged
    santacoder = json.loads((out / "gpu-cpu-tiny.json").read_text())
    measured = {(r["phase"], r["batch_size"], r["system"], r["graphs"]) for r in santacoder["results"]}
    assert {("decode", b, "splitserve", g) for b in (1, 8, 64, 256) for g in (True, False)} <= measured
    assert {("decode", b, "transformers", False) for b in (1, 8)} <= measured
    assert ("prefill", 1, "splitserve", False) in measured and not santacoder["skipped"]
    assert santacoder["graphs"] == "the CPU twin (capture=False)" and santacoder["engines"][0]["graphs"] == 0
    assert len(santacoder["targets"]) == 5 and all(t["value"] is not None and t["ok"] is None
                                                   for t in santacoder["targets"])
    qwen = json.loads((out / "gpu-cpu-llama-tiny.json").read_text())
    assert {(r["batch_size"], r["graphs"]) for r in qwen["results"] if r["phase"] == "decode"} == {
        (1, True), (16, True), (1, False), (16, False)}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["clean"] and summary["rerun"] == [] and summary["correctness"]["failed"] == 0
    assert "== device pass: cpu" in done.stdout and "targets:" in done.stdout
    assert "== device pass: cpu" in (out / "device-pass.log").read_text()
    # What the device tool brings back of $OUT: at most 8 files, plainly named, no folders.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(OUT_NAME.fullmatch(f) and (out / f).is_file() for f in files), files
    assert {"gpu-cpu-tiny.png", "gpu-cpu-llama-tiny.png"} <= set(files)


def test_a_rerun_runs_only_its_stages_and_a_stage_past_its_limit_is_killed(tmp_path):
    # This venv as the machine, set up already (a warm machine): no setup stage.
    done, out = run_pass(tmp_path, dict(PY=sys.executable), "--stages", "correctness,qwen7b",
                         "--limit", "correctness=1", "--budget", "50")
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    got = records(out)
    stages = {r["stage"]: r for r in got if r["item"] == "stage"}
    assert stages.keys() == {"correctness", "qwen7b"}
    assert stages["correctness"]["status"] == "killed" and stages["correctness"]["seconds"] < 10
    # 50 s of budget, less the end's 10 and the correctness stage's second: under qwen7b's 45
    assert stages["qwen7b"]["status"] == "skipped" and "of the budget left" in stages["qwen7b"]["reason"]
    assert json.loads((out / "summary.json").read_text())["rerun"] == ["setup", "correctness", "qwen7b"]
    assert "rerun: bash bench/gpu/device_pass.sh --stages setup,correctness,qwen7b" in done.stdout


def test_a_failed_measurement_costs_its_own_row_alone(tiny_dir, tmp_path, monkeypatch):
    """On the device a failure must not take the rest of a stage with it: here the graphs' first
    run breaks after admitting its requests, and transformers has no model at all."""
    import torch

    from splitserve.bench.engine_runs import Repeats, SplitserveRunner

    gpu_bench = script("gpu_bench")

    model = load_cpu(tiny_dir)
    limits = gpu_bench.Limits(100.0, 1.0, gpu_bench.weight_bytes(model.weights),
                              gpu_bench.kv_bytes_per_token(model.cfg, model.dtype))
    steps, calls = SplitserveRunner._steps, []

    def breaks_once(self, n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("boom")
        steps(self, n)

    monkeypatch.setattr(SplitserveRunner, "_steps", breaks_once)
    seen = []
    sink = gpu_bench.Sink({}, tmp_path / "doc.json", lambda rows: [dict(rows=len(rows))], seen.append)
    block = gpu_bench.Block("decode", [gpu_bench.decode(40, 2, 4, gpu_bench.ALL)])
    with torch.inference_mode():
        gpu_bench.measure_block(block, model, None, limits, Repeats(1, 0.0), 64, time.monotonic() + 60, sink)
    doc = json.loads((tmp_path / "doc.json").read_text())
    assert [(f["system"], f["reason"].split(":")[0]) for f in doc["failed"]] == [("graphs", "RuntimeError"),
                                                                                ("transformers", "AttributeError")]
    assert [(r["system"], r["graphs"]) for r in doc["results"]] == [("splitserve", False)]  # eager, after the reset
    assert doc["targets"] == [dict(rows=1)] and [r.get("status") for r in seen] == ["failed", None, "failed"]
