# `make test` and `make serve` set up .venv themselves: a fresh clone needs nothing else.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splitserve-installed
# Link tree that lets static tools (basedpyright, IDEs) resolve `splitserve.*` imports; see LINK_TREE below.
LINKS := $(VENV)/splitserve-links
# With no NVIDIA GPU the CPU build of PyTorch is installed first, so that nothing pulls a CUDA
# build of several GB. Point TORCH_CPU / PIP_EXTRA_INDEX_URL elsewhere where that pin differs.
TORCH_CPU ?= torch==2.13.0
# The NIXL wheel for --kv-transport nixl, installed where pip can (tests that need it skip elsewhere):
# nixl-cu13 on the CPU and CUDA 13, nixl-cu12 for CUDA 12; empty for none.
NIXL_EXTRA ?= nixl-cu13
PYTEST_ARGS ?=

.PHONY: test serve install clean

# `install` always refreshes the link tree (it rewrites it only when the set of linked files
# changes, so it costs a Python start); pip runs again only when pyproject.toml changes.
install: $(STAMP)
	@$(PY) -c "$$LINK_TREE" $(LINKS)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing PyTorch (CUDA)"; $(PY) -m pip install -q "torch>=2.11"; \
	  else \
	    echo "installing PyTorch (CPU): $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	  fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@if [ -n "$(NIXL_EXTRA)" ]; then $(PY) -m pip install -q -e ".[dev,$(NIXL_EXTRA)]" \
	  || echo "NIXL ($(NIXL_EXTRA)) did not install here: the tests that need it will skip"; fi
	@touch $@

# The editable install above is setuptools' default one: an import hook that maps
# `splitserve.common` to common/ and so on, which Python follows (from any directory, the
# repository root included) but static tools cannot. For them this writes a link tree,
# $(LINKS)/splitserve/, from `package-dir` in pyproject.toml: each mapped folder is one
# directory symlink (common -> ../common), and the entries of splitserve/ itself are linked one
# by one beside them; a .pth file in site-packages puts the tree on the path. Through a
# directory symlink a module added to common/ is seen at once, and an editor that saves by
# replacing the file replaces the repository's file. The tree is rebuilt only when the set of
# links changes (an entry added to or removed from splitserve/, a folder mapped or unmapped).
define LINK_TREE
import os, shutil, sys, sysconfig
from pathlib import Path
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
links = Path(sys.argv[1]).absolute()
with open("pyproject.toml", "rb") as f:
    mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
want = {}
for name, folder in mapping.items():
    source, at = Path(folder).absolute(), Path(*name.split("."))
    if any(other.startswith(name + ".") for other in mapping):  # other packages are mapped into it
        for entry in source.iterdir():
            if entry.name != "__pycache__" and f"{name}.{entry.name}" not in mapping:
                want[str(at / entry.name)] = str(entry)
    else:
        want[str(at)] = str(source)
manifest = "".join(f"{k} -> {v}\n" for k, v in sorted(want.items())) + f"{links}\n"
pth = Path(sysconfig.get_paths()["purelib"], "splitserve-links.pth")
state = [f.read_text() if f.is_file() else None for f in (links / ".manifest", pth)]
if state == [manifest, f"{links}\n"]:
    sys.exit(0)  # nothing added, removed or remapped since the last run
shutil.rmtree(links, ignore_errors=True)
for at, target in sorted(want.items()):
    (links / at).parent.mkdir(parents=True, exist_ok=True)
    (links / at).symlink_to(target, target_is_directory=os.path.isdir(target))
(links / ".manifest").write_text(manifest)
pth.write_text(f"{links}\n")
print(f"linked {len(want)} entries under {links} for static tools")
endef
export LINK_TREE

# Extra flags for `splitserve serve`, e.g. make serve SERVE_ARGS="--model /models/santacoder"
SERVE_ARGS ?=

serve: install
	$(VENV)/bin/splitserve serve $(SERVE_ARGS)

test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
