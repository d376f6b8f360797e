"""What the tests of the pipeline benchmarks share: running `splitserve bench KIND --quick` as a
user would, and finding the processes it should have stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_THREADS


def processes_mentioning(text: str, program: str = "splitserve.cli") -> list[str]:
    """Command lines of live processes of `program` (a module run with -m) that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if program in args and any(text in a for a in args):
            found.append(" ".join(args))
    return found


def run_quick_bench(kind: str, home: Path, tmp_path: Path, printed: str, timeout: float, *flags: str) -> dict:
    """`splitserve bench KIND --quick [flags]` on the test threads, its JSON (KIND.json) and plot written to
    tmp_path: asserts that it succeeds, prints `printed` and leaves no pipeline process behind
    (`home`: the SPLITSERVE_HOME its processes were started with); returns the JSON document."""
    out = tmp_path / f"{kind}.json"
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", kind, "--quick", "--threads", str(TEST_THREADS),
           "--json", str(out), "--plot-dir", str(tmp_path), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)  # SPLITSERVE_HOME from `home`
    assert done.returncode == 0, done.stdout + done.stderr
    assert printed in done.stdout
    assert not processes_mentioning(str(home)), "a pipeline process outlived the benchmark"
    return json.loads(out.read_text())
