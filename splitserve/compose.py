"""The docker-compose file for one node: a router, the frontends, and one container per prefill or
decode worker.

The router keeps the fleet's books and publishes nothing on the host. The frontends own the
clients: HTTP and WebSocket on one shared port (SO_REUSEPORT), each its own ZMQ client port
(ZMQ_PORT + i) and its own token port (TOKEN_PORT + i), which workers dial at `frontend`. With one
frontend, the `frontend` service is that frontend. With K > 1 the frontends share one network
namespace, as the containers of a Kubernetes pod do: the `frontend` service holds it and publishes
its ports (a process that only sleeps, the pod's pause container, so that a frontend's crash never
takes the namespace from the others), and frontend-0 .. frontend-K-1 join it (`network_mode:
service:frontend`) and share its HTTP port as processes on one host do. Separate containers
could not share one published host port; `docker compose up --scale` would need a proxy in front.

Every worker container sees every GPU of the node and picks its own with `--device cuda:N`:
a CUDA IPC handle can only be opened by a process that sees the GPU it came from. `ipc: host`
and `pid: host` let CUDA IPC (and, on CPU, the /dev/shm staging) work across containers, and
all workers claim one `--host-id`, so the router treats the containers as one machine.

A checkpoint is built into the image (the built-in models), a host directory mounted read-only, or
a Hugging Face Hub repository: the one-shot `model` service fetches that into a named volume, the
image's Hugging Face cache, and every other service starts once it has finished and reads the
volume read-only and offline (the image's HF_HUB_OFFLINE), so all of them serve the one commit it
fetched, restarted ones too. Router and frontends read only its config and tokenizer.

An API key file and CURVE key pairs reach the containers as compose secrets (read-only bind
mounts under /run/secrets), each container getting only the files it reads: the frontends the
API key, the router and the frontends the router's key pair (`gateway.key*`: frontends serve
workers with it) and the workers' public key, a worker its own pair and the router's public key.
A worker holding the router's secret key could pose as the router.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.common.builtin_models import is_builtin
from splitserve.common.hub import is_repo_id
from splitserve.common.service_config import worker_argv
from splitserve.gateway.options import frontend_argv, router_argv

IMAGE = "splitserve:latest"
CPU_IMAGE = "splitserve:cpu"
HTTP_PORT, ZMQ_PORT, WORKER_PORT, FRONTEND_PORT, METRICS_PORT = 8080, 5555, 5556, 5557, 9090
TOKEN_PORT = 5600  # frontend i's token port is TOKEN_PORT + i, its ZMQ client port ZMQ_PORT + i
MAX_FRONTENDS = 32  # so that the ZMQ client ports stay below the token ports
FRONTENDS = "frontend"  # the service whose network namespace the frontends share, and whose ports it publishes
HOST_ID = "compose-node"  # one node: every container claims the same machine
# A worker Docker starts again may load its model for this long (the health checks' start period):
# the requests of a role's last worker wait that long for it (--worker-restart-timeout)
START_PERIOD_S = 300
MODELS_DIR = "/models"  # where a checkpoint from the host is mounted, read-only
HF_HOME = "/opt/splitserve/hf"  # the image's Hugging Face cache ($HF_HOME), where a Hub model's volume is mounted
HF_VOLUME = "hf-cache"  # the named volume that holds a Hub model
FETCHER = "model"  # the one-shot service that fetches a Hub model before the others start
# The CPU profile's image: Ubuntu without CUDA, and PyTorch's CPU wheels (a tenth of the size).
CPU_BUILD_ARGS = {"BUILD_BASE": "ubuntu:24.04", "RUNTIME_BASE": "ubuntu:24.04",
                  "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
# The repository root when running from a checkout; an installed package has no Dockerfile beside it.
REPO_ROOT = Path(__file__).resolve().parents[1]
SECRETS_DIR = "/run/secrets"  # where compose mounts a service's secrets
# --curve-dir: a pair for the router (which its frontends serve with too) and one the workers share,
# as `splitserve keygen` writes them
CURVE_FILES = ("gateway.key", "gateway.key_secret", "worker.key", "worker.key_secret")
API_KEY = "api-key"  # the API key's secret, and its file under SECRETS_DIR
CURVE_CLIENTS = "curve-clients"  # --curve-clients of the router and frontends: a directory holding worker.key alone


@dataclass(frozen=True)
class NodeLayout:
    prefill: tuple[str, ...]  # one --device per prefill worker: cuda:N, or cpu
    decode: tuple[str, ...]
    model: str  # a built-in name, a checkpoint directory on the host, or a Hub repository id
    threads: int  # PyTorch threads per worker
    bind: str  # host address the frontends' ports are published on
    api_key_file: Path | None = None  # on the host: the key the frontends ask every client for
    curve_dir: Path | None = None  # on the host: CURVE_FILES, for the links to and from workers
    frontends: int = 1  # frontend processes, one container each
    revision: str = ""  # of a Hub repository: a branch, tag or commit ("": main)


def parse_gpus(spec: str, flag: str) -> tuple[int, ...]:
    """'0,1' or '2-7' or '0,2-3' -> GPU indices, each once, in the order given."""
    gpus: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: {part!r} is not a GPU index or a range like 2-7") from None
        if first < 0 or last < first:
            raise ValueError(f"{flag} {spec!r}: {part!r} is not a range of GPU indices (first <= last, from 0)")
        gpus.extend(range(first, last + 1))
    repeated = sorted({g for g in gpus if gpus.count(g) > 1})
    if repeated:
        raise ValueError(f"{flag} {spec!r} names GPU {', '.join(map(str, repeated))} more than once")
    return tuple(gpus)


def gpu_layout(prefill_spec: str, decode_spec: str, model: str, threads: int, bind: str) -> NodeLayout:
    prefill = parse_gpus(prefill_spec, "--prefill-gpus")
    decode = parse_gpus(decode_spec, "--decode-gpus")
    shared = sorted(set(prefill) & set(decode))
    if shared:
        raise ValueError(f"GPU {', '.join(map(str, shared))} is in both --prefill-gpus and --decode-gpus: "
                         "each worker owns its GPU")
    return NodeLayout(tuple(f"cuda:{g}" for g in prefill), tuple(f"cuda:{g}" for g in decode), model, threads, bind)


def cpu_layout(prefill_workers: int, decode_workers: int, model: str, threads: int, bind: str) -> NodeLayout:
    if prefill_workers < 1 or decode_workers < 1:
        raise ValueError("the CPU profile needs at least one prefill and one decode worker")
    return NodeLayout(("cpu",) * prefill_workers, ("cpu",) * decode_workers, model, threads, bind)


def with_frontends(layout: NodeLayout, frontends: int) -> NodeLayout:
    if not 1 <= frontends <= MAX_FRONTENDS:
        raise ValueError(f"--frontends {frontends}: give 1 to {MAX_FRONTENDS}")
    return replace(layout, frontends=frontends)


def secured(layout: NodeLayout, api_key_file: str, curve_dir: str) -> NodeLayout:
    """`layout` with the API key and the CURVE keys that are given ("": none), checked on the host."""
    api_key = Path(api_key_file).expanduser().resolve() if api_key_file else None
    if api_key and not api_key.is_file():
        raise ValueError(f"--api-key-file {api_key_file!r} is not a file")
    return replace(layout, api_key_file=api_key, curve_dir=_curve_dir(curve_dir) if curve_dir else None)


def _curve_dir(spec: str) -> Path:
    directory = Path(spec).expanduser().resolve()
    missing = [name for name in CURVE_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"--curve-dir {spec!r} lacks {', '.join(missing)}: write them with "
                         f"`splitserve keygen {spec} --name gateway` and `splitserve keygen {spec} --name worker`")
    return directory


def compose_file(layout: NodeLayout, out_dir: Path) -> dict:
    """The compose document; `out_dir` is where it will be written (build paths are relative to it)."""
    cpu = layout.prefill[0] == "cpu"
    model, volumes = _model(layout.model, layout.revision)
    router_flags, router_secrets = _router_secrets(layout)
    services = {"router": _with_secrets(_router(model, volumes), router_flags, router_secrets)}
    services |= _frontends(layout, model, volumes)
    for role, devices in (("prefill", layout.prefill), ("decode", layout.decode)):
        for i, device in enumerate(devices):
            # a GPU worker is named by its GPU, so that the file reads like the node
            name = f"{role}-{device.removeprefix('cuda:') if device.startswith('cuda:') else i}"
            services[name] = _with_secrets(_worker(role, name, device, model, volumes, layout.threads),
                                           *_worker_secrets(layout, role))
    hub = is_repo_id(model["model"])
    if hub:
        for service in services.values():
            if volumes[0] in service.get("volumes", []):  # not the frontends' holder: it reads no model
                service.setdefault("depends_on", {})[FETCHER] = {"condition": "service_completed_successfully"}
        services = {FETCHER: _fetcher(model), **services}
    # Every service builds the same image (Docker's layer cache makes the repeats free), so that
    # `up` works with nothing built beforehand and no registry.
    for name, service in services.items():
        # a new build dict each: PyYAML writes one shared by two services as an anchor and an alias
        build = _build(out_dir, cpu)
        services[name] = {"image": CPU_IMAGE if cpu else IMAGE, **({"build": build} if build else {}), **service}
    doc = {"name": "splitserve-cpu" if cpu else "splitserve", "services": services}
    if hub:
        doc["volumes"] = {HF_VOLUME: {}}
    secrets = _secret_files(layout)
    if secrets:
        doc["secrets"] = secrets
    return doc


def _model(model: str, revision: str) -> tuple[dict[str, str], list[str]]:
    """The model's flags inside the containers, and the read-only mount that provides it."""
    host_dir = Path(model).expanduser().resolve()
    if is_builtin(model):
        flags, mounts = {"model": model}, []  # created in the image at build time
    elif host_dir.is_dir():
        inside = f"{MODELS_DIR}/{host_dir.name}"
        flags, mounts = {"model": inside}, [f"{host_dir}:{inside}:ro"]
    elif is_repo_id(model):
        return {"model": model, **({"revision": revision} if revision else {})}, [f"{HF_VOLUME}:{HF_HOME}:ro"]
    else:
        raise ValueError(f"--model {model!r} is neither a built-in model, a directory on this host nor a Hugging "
                         "Face Hub repository id (owner/name)")
    if revision:
        raise ValueError(f"--revision {revision!r} is for a Hugging Face Hub repository id, not --model {model!r}")
    return flags, mounts


def _fetcher(model: dict[str, str]) -> dict:
    """The one-shot service that fetches a Hub model into HF_VOLUME (the only one writing it), once
    each `up`, with huggingface_hub's progress; the others start when it has finished."""
    revision = ["--revision", model["revision"]] if "revision" in model else []
    return {
        "command": ["model-path", model["model"], *revision],
        # the image is offline; HF_TOKEN (gated repositories) passes through from compose's environment
        "environment": ["HF_HUB_OFFLINE=0", "HF_TOKEN"],
        "volumes": [f"{HF_VOLUME}:{HF_HOME}"],
        "healthcheck": {"disable": True},
    }


def _router(model: dict[str, str], volumes: list[str]) -> dict:
    """The router: no port on the host; workers and frontends reach it on the compose network,
    its /health, /metrics and /info answer on METRICS_PORT."""
    flags = {**model, "host": "0.0.0.0", "worker_port": WORKER_PORT, "frontend_port": FRONTEND_PORT,
             "metrics_port": METRICS_PORT, "worker_restart_timeout": START_PERIOD_S}
    return {"command": ["router", *router_argv(flags)], **_common(METRICS_PORT, volumes)}


def frontend_names(frontends: int) -> list[str]:
    """The services that run a frontend, in the order of their ports."""
    return [FRONTENDS] if frontends == 1 else [f"{FRONTENDS}-{i}" for i in range(frontends)]


def _frontends(layout: NodeLayout, model: dict[str, str], volumes: list[str]) -> dict[str, dict]:
    k = layout.frontends
    # every frontend's HTTP port is the one shared port; ZMQ ports and token ports are one each
    ports = [f"{layout.bind}:{HTTP_PORT}:{HTTP_PORT}"]
    ports += [f"{layout.bind}:{ZMQ_PORT + i}:{ZMQ_PORT + i}" for i in range(k)]
    key_flags, secrets = _frontend_secrets(layout)
    services = {}
    for i, name in enumerate(frontend_names(k)):
        flags = {**model, "router": f"tcp://router:{FRONTEND_PORT}", "host": "0.0.0.0",
                 # workers dial the token port by the name of the service whose network it is on
                 "advertise_host": FRONTENDS, "port": HTTP_PORT, "zmq_port": ZMQ_PORT + i,
                 "token_port": TOKEN_PORT + i}
        service = {"command": ["frontend", *frontend_argv(flags)], "depends_on": {"router": {"condition": "service_started"}}}
        if k == 1:
            service["ports"] = ports
        else:
            service["network_mode"] = f"service:{FRONTENDS}"
            # `restart`: a holder that compose restarts takes with it the namespace the frontends were in
            service["depends_on"][FRONTENDS] = {"condition": "service_started", "restart": True}
        # with K > 1 the health check reaches whichever frontend the kernel gives the connection
        services[name] = _with_secrets(service | _common(HTTP_PORT, volumes), key_flags, list(secrets))
    if k > 1:
        holder = {"entrypoint": ["sleep", "infinity"], "init": True, "ports": ports, **_common(HTTP_PORT, [])}
        holder["stop_grace_period"] = "5s"  # it holds no request: compose stops the frontends first
        services = {FRONTENDS: holder, **services}
    return services


def _worker(role: str, name: str, device: str, model: dict[str, str], volumes: list[str], threads: int) -> dict:
    flags = {**model, "device": device, "threads": threads, "gateway": f"tcp://router:{WORKER_PORT}",
             "host": "0.0.0.0", "advertise_host": name, "host_id": HOST_ID, "worker_id": name,
             "metrics_port": METRICS_PORT}
    service = {
        "command": [role, *worker_argv(role, flags)],
        "ipc": "host",
        "depends_on": {"router": {"condition": "service_started"}},
        **_common(METRICS_PORT, volumes),
    }
    if device != "cpu":
        service["pid"] = "host"  # CUDA IPC needs both processes in one PID namespace
        service["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}
    return service


def _secret_files(layout: NodeLayout) -> dict:
    """The top-level secrets: each host file by the name services mount it by."""
    files = {API_KEY: layout.api_key_file} if layout.api_key_file else {}
    if layout.curve_dir:
        files |= {name: layout.curve_dir / name for name in CURVE_FILES}
    return {name: {"file": str(path)} for name, path in files.items()}


def _curve_server_secrets(layout: NodeLayout) -> tuple[dict, list]:
    """The router's key pair and the workers' public key, for the router and the frontends alike."""
    if not layout.curve_dir:
        return {}, []
    # --curve-clients reads every *.key of a directory: one holding worker.key lets in only the
    # workers (and the router's own key, always: the frontends join the router with it)
    flags = {"curve_secret_file": f"{SECRETS_DIR}/gateway.key_secret", "curve_clients": f"{SECRETS_DIR}/{CURVE_CLIENTS}"}
    return flags, ["gateway.key_secret", {"source": "worker.key", "target": f"{CURVE_CLIENTS}/worker.key"}]


def _router_secrets(layout: NodeLayout) -> tuple[list[str], list]:
    """The router's flags that name its secrets, and those secrets (no API key: it has no clients)."""
    flags, secrets = _curve_server_secrets(layout)
    return router_argv(flags), secrets


def _frontend_secrets(layout: NodeLayout) -> tuple[list[str], list]:
    """A frontend's flags that name its secrets, and those secrets."""
    flags, secrets = _curve_server_secrets(layout)
    if layout.api_key_file:
        flags = {"api_key_file": f"{SECRETS_DIR}/{API_KEY}", **flags}
        secrets = [API_KEY, *secrets]
    return frontend_argv(flags), secrets


def _worker_secrets(layout: NodeLayout, role: str) -> tuple[list[str], list]:
    """A worker's flags that name its secrets, and those secrets (the API key is the frontends' alone)."""
    if not layout.curve_dir:
        return [], []
    flags = {"curve_secret_file": f"{SECRETS_DIR}/worker.key_secret", "curve_server_key": f"{SECRETS_DIR}/gateway.key"}
    return worker_argv(role, flags), ["worker.key_secret", "gateway.key"]


def _with_secrets(service: dict, flags: list[str], secrets: list) -> dict:
    """`service` with `secrets` mounted and its command given `flags`, which name them."""
    if secrets:
        service["command"] += flags
        service["secrets"] = secrets
    return service


def _common(health_port: int, volumes: list[str]) -> dict:
    common = {
        "healthcheck": {"test": ["CMD", "python", "/opt/splitserve/healthcheck.py", str(health_port)],
                        "interval": "10s", "timeout": "3s", "retries": 3, "start_period": f"{START_PERIOD_S}s"},
        "restart": "unless-stopped",
        # SIGTERM drains (up to --drain-timeout, 30 s): Docker's default 10 s would cut it short
        "stop_grace_period": "45s",
    }
    if volumes:
        common["volumes"] = list(volumes)
    return common


def _build(out_dir: Path, cpu: bool) -> dict | None:
    if not (REPO_ROOT / "deploy" / "Dockerfile").is_file():
        return None
    build = {"context": os.path.relpath(REPO_ROOT, out_dir.resolve()), "dockerfile": "deploy/Dockerfile"}
    if cpu:
        build["args"] = dict(CPU_BUILD_ARGS)
    return build
