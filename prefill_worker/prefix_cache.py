"""The prefill worker's prefix cache: the K/V of recent prompts, kept in fixed blocks of tokens.

Editors resend the same file on every pause in typing, so most of each prompt is a prompt seen
a moment ago. A block is found by the hash of every token id up to its end (prefix_blocks.py), so
a hit on block i means the prompt's first (i + 1) * B tokens are a cached prompt's; the block's
own ids are compared as well, so that a hash collision can never serve wrong K/V. Blocks go least
recently used first within the memory given; a lookup or an insert refreshes a prompt's blocks from
its last to its first, so that a prefix always outlives the blocks that extend it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from splitserve.common.prefix_blocks import block_hashes


@dataclass
class _Block:
    index: int  # in the store
    ids: tuple[int, ...]  # the block's own token ids, to rule out a hash collision


class PrefixCache:
    def __init__(self, n_layer: int, kv_heads: int, head_dim: int, block_tokens: int, capacity_blocks: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_tokens, self.capacity = block_tokens, capacity_blocks
        # [N, n_layer, 2, B, KVH, D]: one block's K/V contiguous
        self.store = torch.empty(capacity_blocks, n_layer, 2, block_tokens, kv_heads, head_dim, dtype=dtype,
                                 device=device)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self.looked_up = self.found = 0  # prompt tokens, for the metrics

    @property
    def used_blocks(self) -> int:
        return len(self._blocks)

    def block_bytes(self) -> int:
        return self.store[0].numel() * self.store.element_size()

    def match(self, ids: tuple[int, ...], namespace: bytes = b"") -> tuple[list[int], list[bytes]]:
        """The store indices of the longest cached prefix of `ids` that leaves at least one token to
        compute (its last token's logits are what a prefill is for), and the prompt's block hashes
        (in `namespace`: see block_hashes)."""
        hashes = block_hashes(ids, self.block_tokens, namespace)
        usable = (len(ids) - 1) // self.block_tokens
        found = []
        for i, h in enumerate(hashes[:usable]):
            block = self._blocks.get(h)
            if block is None or block.ids != ids[i * self.block_tokens : (i + 1) * self.block_tokens]:
                break
            found.append(block.index)
        return found, hashes

    def lookup(self, ids: tuple[int, ...], matched: tuple[list[int], list[bytes]] | None = None,
               namespace: bytes = b"") -> list[int]:
        """As `match` (or what it gave for `ids`, `matched`, the cache unchanged since), counted in the
        metrics and refreshed in the LRU order."""
        found, hashes = matched or self.match(ids, namespace)
        self.looked_up += len(ids)
        self.found += len(found) * self.block_tokens
        self._touch(hashes[: len(found)])
        return found

    def copy_out(self, found: list[int], region: torch.Tensor) -> None:
        """Put the K/V of blocks `found` at the start of a staging region [n_layer, 2, n, KVH, D]."""
        if found:
            blocks = self.store[torch.tensor(found, device=self.store.device)]  # [F, n_layer, 2, B, KVH, D]
            n = len(found) * self.block_tokens
            region[:, :, :n] = blocks.permute(1, 2, 0, 3, 4, 5).reshape(*region.shape[:2], n, *region.shape[3:])

    def insert(self, ids: tuple[int, ...], region: torch.Tensor, namespace: bytes = b"") -> None:
        """Keep the full blocks of a prompt whose K/V are in `region` [n_layer, 2, len(ids), KVH, D],
        evicting the least recently used blocks for room."""
        hashes = block_hashes(ids, self.block_tokens, namespace)
        b = self.block_tokens
        for i, h in enumerate(hashes):
            if h in self._blocks:
                continue
            if not self._free:
                if not self._evict(protect=set(hashes)):
                    break  # every block in the store is this prompt's
            index = self._free.pop()
            self.store[index] = region[:, :, i * b : (i + 1) * b]
            self._blocks[h] = _Block(index, tuple(ids[i * b : (i + 1) * b]))
        self._touch([h for h in hashes if h in self._blocks])

    def _touch(self, hashes: list[bytes]) -> None:
        for h in reversed(hashes):  # the prefix last: most recently used, evicted after what extends it
            self._blocks.move_to_end(h)

    def _evict(self, protect: set[bytes]) -> bool:
        for h in self._blocks:
            if h not in protect:
                self._free.append(self._blocks.pop(h).index)
                return True
        return False

    def clear(self) -> None:
        self._free.extend(block.index for block in self._blocks.values())
        self._blocks.clear()
