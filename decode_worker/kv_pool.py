"""The decode worker's static KV pool: allocated once, handed out slot by slot, lowest first."""

from __future__ import annotations

import heapq

import torch

from splitserve.common.model_config import ModelConfig


def slot_bytes(cfg: ModelConfig, slot_len: int, dtype: torch.dtype) -> int:
    return cfg.n_layer * 2 * cfg.kv_dim * slot_len * torch.finfo(dtype).bits // 8


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


def slots_if_shorter(num_slots: int, slot_len: int, device_type: str) -> int:
    """How many slots of SHORT_SLOT tokens the memory of `num_slots` of `slot_len` would hold (up
    to DEFAULT_SLOTS), when that is more; else 0."""
    most = DEFAULT_SLOTS[device_type]
    if num_slots >= most or slot_len <= SHORT_SLOT:
        return 0
    return min(most, num_slots * slot_len // SHORT_SLOT)


def allocate_pool(cfg: ModelConfig, num_slots: int, slot_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    # [n_layer, 2, S, KVH, L, D]: with S and KVH leading a slot's keys are one contiguous
    # [L, D] block per head, so a step reads the first B slots as a strided view.
    return torch.zeros(cfg.n_layer, 2, num_slots, cfg.kv_heads, slot_len, cfg.head_dim, dtype=dtype, device=device)


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
