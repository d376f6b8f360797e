"""The decode worker's static KV pool: allocated once, handed out slot by slot, lowest first."""

from __future__ import annotations

import heapq
from typing import NamedTuple

import torch

from splitserve.common.model_config import ModelConfig


def slot_bytes(cfg: ModelConfig, keys: tuple[int, ...], dtype: torch.dtype) -> int:
    """A slot's bytes, holding keys[i] keys in layer i (model.layer_keys)."""
    return 2 * cfg.kv_dim * sum(keys) * torch.finfo(dtype).bits // 8


# --num-slots 0: at most this many
DEFAULT_SLOTS = {"cuda": 256, "cpu": 64}
# --kv-cache-memory-mb 0: the pool takes this share of the memory free once the model is loaded. The
# rest: on a GPU the step's activations and logits and the CUDA graphs; on the host its other
# processes (prefill workers, frontends), which may still be starting.
FREE_SHARE = {"cuda": 0.8, "cpu": 0.5}
SHORTER = "--max-total-tokens (a slot's length) or --num-slots lower"
# A model's full context (16k-32k tokens) is far longer than most completions need: a pool that
# memory holds to fewer slots than DEFAULT_SLOTS says how many slots of this length would fit.
SHORT_SLOT = 8192


def pool_slots(per_slot: int, slot_len: int, free: int, device_type: str, num_slots: int, budget_mb: int) -> int:
    """How many slots of `per_slot` bytes the pool gets, `free` bytes being free on its device:
    --num-slots, capped by --kv-cache-memory-mb when given; else as many as that budget holds, or
    FREE_SHARE of `free`, up to DEFAULT_SLOTS. A model whose slots are long (32k tokens: a few GiB
    each at 7B) gets fewer slots rather than a pool that cannot be allocated; flags asking for
    more than is free get an error that says so, rather than the allocator's."""
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    if budget_mb:
        fit, where = budget_mb * 2**20 // per_slot, f"--kv-cache-memory-mb {budget_mb}"
    elif num_slots:
        fit, where = num_slots, ""
    else:
        fit = int(free * FREE_SHARE[device_type]) // per_slot
        where = f"{FREE_SHARE[device_type]:.0%} of the {mib(free)} free"
    if fit < 1:
        raise ValueError(f"{where} holds no KV slot of {slot_len} tokens ({mib(per_slot)} each): set {SHORTER}")
    slots = min(fit, num_slots or DEFAULT_SLOTS[device_type])
    if slots * per_slot > free:
        raise ValueError(f"{slots} KV slots of {slot_len} tokens need {mib(slots * per_slot)}; {mib(free)} is free: "
                         f"set {SHORTER}")
    return slots


def slots_if_shorter(num_slots: int, keys: tuple[int, ...], device_type: str) -> int:
    """How many slots of SHORT_SLOT tokens the memory of `num_slots` slots holding keys[i] keys in
    layer i would hold (up to DEFAULT_SLOTS; a windowed layer's ring is as long in either), when
    that is more; else 0."""
    most = DEFAULT_SLOTS[device_type]
    if num_slots >= most or max(keys) <= SHORT_SLOT:
        return 0
    return min(most, num_slots * sum(keys) // sum(min(k, SHORT_SLOT) for k in keys))


class KvGroup(NamedTuple):
    """The layers whose slots hold the same number of keys, L (model.layer_keys), in one tensor."""

    kv: torch.Tensor  # [n, 2, S, KVH, L, D]
    # (the layers' slice of the model's layers, the slice of kv's first dim they are): arithmetic
    # runs, each one strided copy or NIXL read of a prompt's K/V (gpt-oss's windowed layers are
    # 0, 2, 4, ...: one run)
    runs: tuple[tuple[slice, slice], ...]


class KvPool(NamedTuple):
    """The decode worker's K/V: per group of layers, and per layer, views of one allocation."""

    flat: torch.Tensor  # the one allocation every group is a view of (what NIXL registers)
    groups: tuple[KvGroup, ...]
    layers: tuple[torch.Tensor, ...]  # per layer [2, S, KVH, L, D], views of its group


def allocate_pool(cfg: ModelConfig, num_slots: int, keys: tuple[int, ...], dtype: torch.dtype, device) -> KvPool:
    """A pool whose slots hold keys[i] keys in layer i: windowed layers only their ring, so that a
    model windowed on some layers (gpt-oss, Gemma 2 and 3) gets as many more slots as the rings
    save. Each group of layers with the same L is a tensor [n, 2, S, KVH, L, D]: with S and KVH
    leading a slot's keys are one contiguous [L, D] block per head, so a step reads the first B
    slots as a strided view."""
    per_key = 2 * num_slots * cfg.kv_heads * cfg.head_dim
    flat = torch.zeros(per_key * sum(keys), dtype=dtype, device=device)
    groups, layers, start = [], [None] * len(keys), 0
    for length in sorted(set(keys), reverse=True):
        ids = [i for i, k in enumerate(keys) if k == length]
        size = per_key * length * len(ids)
        kv = flat[start : start + size].view(len(ids), 2, num_slots, cfg.kv_heads, length, cfg.head_dim)
        groups.append(KvGroup(kv, _runs(ids)))
        for j, i in enumerate(ids):
            layers[i] = kv[j]
        start += size
    return KvPool(flat, tuple(groups), tuple(layers))


def _runs(ids: list[int]) -> tuple[tuple[slice, slice], ...]:
    """Ascending layer ids as arithmetic runs: (their slice, the slice of positions in `ids`)."""
    runs, at = [], 0
    while at < len(ids):
        end = at + 1
        step = ids[at + 1] - ids[at] if at + 1 < len(ids) else 1
        while end < len(ids) and ids[end] - ids[end - 1] == step:
            end += 1
        runs.append((slice(ids[at], ids[end - 1] + 1, step), slice(at, end)))
        at = end
    return tuple(runs)


class SlotAllocator:
    """Lowest free slot first, so active rows stay packed at the front of the pool and a step
    runs over a short contiguous prefix."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        self.used: set[int] = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        slot = heapq.heappop(self._free)
        self.used.add(slot)
        return slot

    def give_back(self, slot: int) -> None:
        self.used.remove(slot)
        heapq.heappush(self._free, slot)

    def prefix_len(self) -> int:
        """Rows a step must run over: up to the highest slot in use."""
        return max(self.used) + 1 if self.used else 0
