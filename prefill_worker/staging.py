"""Regions of the prefill worker's staging buffer: held from prefill until the decode worker
says the copy out of it has completed."""

from __future__ import annotations


class RegionAllocator:
    """First-fit allocation of token ranges [offset, offset + n) in a buffer of `total` tokens."""

    def __init__(self, total: int):
        self.total = total
        self._free: list[tuple[int, int]] = [(0, total)]  # sorted, coalesced (offset, length)

    @property
    def free_tokens(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def used_tokens(self) -> int:
        return self.total - self.free_tokens

    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, n: int) -> int | None:
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, length - n)
                return off
        return None

    def free(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        regions = sorted(self._free + [(offset, n)])
        merged = [regions[0]]
        for off, length in regions[1:]:
            last_off, last_len = merged[-1]
            if off < last_off + last_len:
                raise ValueError(f"region [{offset}, {offset + n}) freed twice")
            if off == last_off + last_len:
                merged[-1] = (last_off, last_len + length)
            else:
                merged.append((off, length))
        self._free = merged
