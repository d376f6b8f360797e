"""Shared fixtures. Every test process uses a fixed, small number of PyTorch threads so that
the suite is steady on a 2-core machine, and a private SPLITSERVE_HOME.

Tests that start OS processes carry the `processes` marker, so that `pytest -m "not processes"`
runs the rest in seconds. The hook below gives it to every test whose own code, or the code of a
fixture it uses, starts one, following the functions and classes of tests/ that it calls (a
Cluster, pair_child, a helper of the test module); `@pytest.mark.processes` marks by hand what it
cannot see, such as a process started inside the project's own code."""

from __future__ import annotations

import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

TEST_THREADS = 1
torch.set_num_threads(TEST_THREADS)


# Names whose use starts an OS process (subprocess.run/Popen, multiprocessing, os.fork, ...)
SPAWNS = frozenset({"subprocess", "Popen", "multiprocessing", "create_subprocess_exec", "create_subprocess_shell",
                    "fork", "forkpty", "posix_spawn", "posix_spawnp"})
TESTS = Path(__file__).resolve().parent


def _defined_in_tests() -> dict[str, list]:
    """The functions and classes that the modules of tests/ define, by name."""
    found: dict[str, list] = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(TESTS):
            for name, obj in vars(module).items():
                if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
                    found.setdefault(name, []).append(obj)
    return found


def _codes(obj) -> list[types.CodeType]:
    if inspect.isclass(obj):
        return [c for member in vars(obj).values() for c in _codes(getattr(member, "__func__", member))]
    obj = inspect.unwrap(obj)  # through @contextmanager and other functools.wraps decorators
    return [obj.__code__] if hasattr(obj, "__code__") else []


def _starts_processes(code: types.CodeType, defined: dict[str, list], seen: set) -> bool:
    """Whether `code` names one of SPAWNS, itself or through what it calls (by name) of tests/."""
    if code in seen:
        return False
    seen.add(code)
    if SPAWNS.intersection(code.co_names):
        return True
    inner = [k for k in code.co_consts if isinstance(k, types.CodeType)]  # nested functions, lambdas
    called = [c for name in code.co_names for obj in defined.get(name, ()) for c in _codes(obj)]
    return any(_starts_processes(c, defined, seen) for c in inner + called)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    defined = _defined_in_tests()
    for item in items:
        funcs = [getattr(item, "function", None)]
        fixtures = getattr(item, "_fixtureinfo", None)  # the fixtures it uses, directly or not
        if fixtures is not None:
            funcs += [d.func for name in item.fixturenames for d in fixtures.name2fixturedefs.get(name, ())]
        codes = [c for f in funcs if f is not None for c in _codes(f)]
        seen: set = set()
        if any(Path(c.co_filename).resolve().is_relative_to(TESTS) and _starts_processes(c, defined, seen) for c in codes):
            item.add_marker(pytest.mark.processes)


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("splitserve-home")
    os.environ["SPLITSERVE_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(home) -> Path:
    from splitserve.common.builtin_models import resolve_model

    return resolve_model("tiny-random", home, progress=False)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each code-model family's tokenizer files (tokenizer_families.py), trained and written once."""
    from tokenizer_families import FAMILIES, write

    root = tmp_path_factory.mktemp("tokenizer-families")
    return {name: write(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def mha_dir(tmp_path_factory) -> Path:
    """A random multi-head GPTBigCode checkpoint written by transformers itself."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    from splitserve.common.tokenizer import write_tokenizer_files

    torch.manual_seed(1234)
    cfg = GPTBigCodeConfig(vocab_size=8192, n_positions=512, n_embd=128, n_layer=3, n_head=4, multi_query=False,
                           bos_token_id=0, eos_token_id=0, activation_function="gelu_new")
    model = GPTBigCodeForCausalLM(cfg)
    with torch.no_grad():  # non-trivial biases and norms, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mha-checkpoint")
    model.save_pretrained(path)
    write_tokenizer_files(path)
    return path


def load_cpu(path: Path, dtype=torch.float32):
    from splitserve.common.loading import load_model

    return load_model(path, dtype, torch.device("cpu"), progress=False)


def prompt(n: int, seed: int) -> tuple[int, ...]:
    """n random token ids (none of the special ones) from a seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(5, 8192, (n,), generator=gen).tolist())


def req(i: int, n: int, new: int, **kw):
    """Request r{i}: an n-token random prompt, `new` tokens, end-of-text ignored unless asked."""
    from splitserve.common.request import GenerateRequest

    return GenerateRequest(f"r{i}", prompt(n, i), new, ignore_eos=kw.pop("ignore_eos", True), **kw)


def run_staggered(engine, schedule: dict[int, list]) -> dict:
    """Submit each list of requests just before the given step number, then run to the end:
    request id -> its GenerateResult."""
    from splitserve.engine import GenerateResult, add_event

    results, step = {}, 0
    while step <= max(schedule) or engine.busy:
        for r in schedule.get(step, []):
            results[r.id] = GenerateResult(r.id)
            engine.submit(r)
        for ev in engine.step():
            add_event(results[ev.request_id], ev)
        step += 1
    return results


def hf_model(path: Path):
    from transformers import GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pipeline(home, tiny_dir):
    """A gateway with one prefill and one decode worker of 16 slots on tiny-random, per module."""
    from cluster import Cluster

    with Cluster(home) as c:
        c.start_pipeline(16)
        yield c


# The fuzz tests' pipeline and the good streams running beside the fuzzing (tests/fault). They
# live here because a second conftest.py would shadow this one's `from conftest import ...`.
@pytest.fixture(scope="module")
def fuzzed_cluster(home, tiny_dir):
    from cluster import Cluster
    from fuzz_support import MAX_CONCURRENT, MAX_TOTAL_TOKENS

    with Cluster(home, max_total_tokens=MAX_TOTAL_TOKENS, max_concurrent_requests=MAX_CONCURRENT) as c:
        limit = ("--max-total-tokens", str(MAX_TOTAL_TOKENS))
        c.start_pipeline(16, *limit)
        yield c


@pytest.fixture(scope="module")
def good_traffic(fuzzed_cluster):
    from fuzz_support import GoodTraffic

    with GoodTraffic(fuzzed_cluster.endpoint) as t:
        yield t
    t.check()
