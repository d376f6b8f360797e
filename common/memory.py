"""How much memory a process may still take on its device: what sizes the decode KV pool when no
flag does."""

from __future__ import annotations

from pathlib import Path

import torch

# cgroup v2, then v1: a container's memory limit and what its processes use now
CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def available_bytes(device: torch.device) -> int:
    """Free memory on `device` now: the GPU's, or the host's (see host_available_bytes)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def host_available_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The kernel's MemAvailable, or less where this process's container has a memory limit
    (MemAvailable there is the whole host's: a pod sized by it would be killed at its limit)."""
    available = _meminfo_kb(proc / "meminfo", "MemAvailable") * 1024
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit_text = (cgroup / limit_file).read_text().strip()
            usage = int((cgroup / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit_text != "max":  # v2's "no limit"; v1 says it with a huge number, which min() passes over
            available = min(available, max(0, int(limit_text) - usage))
        break
    return available


def _meminfo_kb(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0])
    raise ValueError(f"{path} has no {field}")
