"""The `text-generation` client (TGI's own Python client) in an environment of its own,
`.venv-tgi-client` at the repository root, made once and reused: it pins huggingface-hub<1,
which transformers 5 cannot live with, so it cannot share the project's environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[1] / ".venv-tgi-client"
PACKAGE = "text-generation>=0.7,<0.8"
INSTALL_TIMEOUT_S = 600


def tgi_python() -> tuple[Path | None, str]:
    """The environment's python, or None and why it could not be made (e.g. no network)."""
    python = VENV / "bin" / "python"
    if (VENV / ".ready").exists():
        return python, ""
    # Built beside its final place and renamed, so that concurrent test runs never see half of one.
    tmp = VENV.with_name(f"{VENV.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(tmp)],
             [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", PACKAGE]]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"{' '.join(cmd[-3:])}: {e}"
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return None, f"{' '.join(cmd[-3:])} failed: {done.stderr.strip()[-500:]}"
    (tmp / ".ready").touch()
    try:
        tmp.rename(VENV)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return python, ""


def run_in_tgi_env(python: Path, script: str, *args: str) -> dict:
    """Run `script` there; it prints one JSON object."""
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
