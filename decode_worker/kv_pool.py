"""The decode worker's static KV pool: allocated once, handed out slot by slot, lowest first."""

from __future__ import annotations

import heapq

import torch

from splitserve.common.model_config import ModelConfig


def slot_bytes(cfg: ModelConfig, slot_len: int, dtype: torch.dtype) -> int:
    return cfg.n_layer * 2 * cfg.kv_dim * slot_len * torch.finfo(dtype).bits // 8


def slots_for_budget(cfg: ModelConfig, slot_len: int, dtype: torch.dtype, budget_bytes: int, max_slots: int) -> int:
    fit = budget_bytes // slot_bytes(cfg, slot_len, dtype)
    if fit < 1:
        raise ValueError(
            f"a KV memory budget of {budget_bytes / 2**20:.0f} MiB holds no slot of {slot_len} tokens "
            f"({slot_bytes(cfg, slot_len, dtype) / 2**20:.1f} MiB each)"
        )
    return min(fit, max_slots)


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
