"""Rules over the project's own source: nothing deserializes with pickle (unpickling a frame runs
whatever code its sender put in it), and every ZeroMQ socket is made where a maximum message size
is set on it (so that no peer can make a process buffer without bound)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "common", "prefill_worker", "decode_worker", "client", "splitserve", "bench")
# Modules that unpickle (or run code) when they load data.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
# Where ZeroMQ sockets are made, each with ZMQ_MAXMSGSIZE: make_socket, and the client's dealer.
SOCKET_FACTORIES = {Path("common/zmq_util.py"), Path("client/_core.py")}


def sources() -> list[tuple[Path, ast.Module]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.append((path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return out


def pickle_uses(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr.endswith("_pyobj"):  # send_pyobj, recv_pyobj, ...
            found.append(node.attr)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and _name(func.value) == "torch":
                found.append("torch.load")  # a pickle underneath; checkpoints are safetensors
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append("allow_pickle")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PICKLING_MODULES:
            found.append(f"{node.value!r} (imported by name?)")
    return found


def _name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def test_no_pickle_in_the_project():
    found = {str(path): uses for path, tree in sources() if (uses := pickle_uses(tree))}
    assert not found, found


def test_the_scan_sees_what_it_looks_for():
    seen = pickle_uses(ast.parse("import pickle\nfrom dill import loads\nsock.recv_pyobj()\ns.send_pyobj(x)\n"
                                 "torch.load(f)\nnp.load(f, allow_pickle=True)\nimportlib.import_module('pickle')\n"))
    assert len(seen) == 7, seen


def test_every_zmq_socket_has_a_maximum_message_size():
    made_elsewhere = []
    for path, tree in sources():
        if path in SOCKET_FACTORIES:
            continue
        for node in ast.walk(tree):
            # ctx.socket(zmq.KIND): a socket made without make_socket
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "socket"
                    and node.args and isinstance(node.args[0], ast.Attribute) and _name(node.args[0].value) == "zmq"):
                made_elsewhere.append(f"{path}:{node.lineno}")
    assert not made_elsewhere, made_elsewhere
    for path in SOCKET_FACTORIES:
        assert "MAXMSGSIZE" in (ROOT / path).read_text(), path
