"""One decode step at the shape chosen for it, assembled in one place for the eager path and for
CUDA graphs, which replay a step only at the shapes they were captured at.

A step's shape is (B rows, key_len keys): B covers the pool's slot prefix up to the highest slot in
use, key_len the longest row's keys. Eagerly B is the prefix itself and key_len a multiple of the
key bucket (8); under graphs B is the prefix rounded up to a batch bucket (1, 2, 4, ... and the slot
count) and key_len a coarser key bucket, so that one graph per (batch bucket x key bucket) covers
every step. Rows past the prefix, like free rows inside it, are free slots that compute at
position 0 of their own slot and are ignored.

Inputs need no copying: a step reads the engine's per-slot `tokens` and `positions` in place
(tensors that never move) and computes the write index and the mask from them, inside the graph.
Outputs land in buffers kept here: logits [B, V] in the step's scratch buffer (shared by every
shape, as steps run one at a time) and, under graphs, the greedy tokens [S]: the argmax is part
of every graph (a read of B x V logits, small beside the step), so an all-greedy batch samples
inside the graph; any other batch runs `sample` on the logits afterwards.

With `capture=False` a bucketed runner runs the very same padded step eagerly: that is how the
CPU tests check what a graph replays.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Sequence

import torch

from splitserve.common.attention import decode_masks
from splitserve.common.model import (DecodeBuffers, ModelWeights, decode_buffers, decode_scratch, decode_step,
                                     decode_write_index, kv_rings, pool_shape, row_offsets)

EAGER_SHAPES = 64  # eager steps kept ready, each a few dozen views of the pool and the scratch buffer


def batch_buckets(num_slots: int) -> list[int]:
    """1, 2, 4, ... below num_slots, then num_slots itself: B never exceeds the pool."""
    sizes = [1 << i for i in range(num_slots.bit_length()) if 1 << i < num_slots]
    return sizes + [num_slots]


def key_buckets(slot_len: int, step: int) -> list[int]:
    """step, 2*step, ... below slot_len, then slot_len itself."""
    if step < 8 or step % 8:
        raise ValueError(f"a key bucket must be a multiple of 8, got {step}")
    return list(range(step, slot_len, step)) + [slot_len]


class StepRunner:
    def __init__(self, weights: ModelWeights, kv: Sequence[torch.Tensor], tokens: torch.Tensor,
                 positions: torch.Tensor, batch_sizes: list[int], key_lens: list[int], capture: bool = False,
                 argmax: bool = False, slot_len: int | None = None):
        """kv: the pool per layer [2, S, KVH, L, D] (kv_pool.KvPool.layers); tokens, positions: the
        engine's per-slot [S] state, read in place by every step. `capture`: CUDA graphs of every
        shape; `argmax`: each step also writes the greedy tokens (always under graphs). slot_len:
        the tokens a slot takes, the longest L unless every layer keeps its keys in one ring
        (model.layer_keys): L is then the ring, and a row past it steps at the last key bucket, its
        keys all in the ring."""
        cfg, dev = weights.cfg, kv[0].device
        num_slots, keys = pool_shape(kv)
        if max(batch_sizes) > num_slots or max(key_lens) > keys:
            raise ValueError(f"buckets up to {max(batch_sizes)} rows x {max(key_lens)} keys exceed the pool "
                             f"({num_slots} slots of {keys})")
        self.weights, self.kv, self.tokens, self.positions = weights, kv, tokens, positions
        self.batch_sizes, self.key_lens = sorted(batch_sizes), sorted(key_lens)
        self.argmax = argmax or capture
        self.scratch = decode_scratch(cfg, kv)  # every shape's intermediates and logits, shared
        self.greedy = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self._key_index = torch.arange(keys, device=dev)
        self._rings = kv_rings(cfg.windows, slot_len or keys)
        # each layer's (ring, L), which its write index depends on; row_offsets per L
        self._writes = [(ring, layer.shape[3]) for ring, layer in zip(self._rings, kv)]
        self._offsets = {length: row_offsets(num_slots, cfg.kv_heads, length, dev) for _, length in self._writes}
        # (B, key_len) -> (a step, the logits it writes): every shape once captured; eagerly the
        # EAGER_SHAPES made last: making a shape's views added 90-140 µs to a CPU step of 0.45-0.6
        # ms (the tiny model at batch 1, every 8th step and each request's first), and shapes
        # recur, as a new request starts at a key bucket the last ones passed through
        self._runs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.captured = capture
        if capture:
            self._capture()

    @classmethod
    def exact(cls, weights: ModelWeights, kv: Sequence[torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor,
              key_bucket: int, slot_len: int | None = None) -> StepRunner:
        """Eager steps over the exact slot prefix, keys rounded up to `key_bucket`."""
        num_slots, keys = pool_shape(kv)
        return cls(weights, kv, tokens, positions, list(range(1, num_slots + 1)), key_buckets(keys, key_bucket),
                   slot_len=slot_len)

    @classmethod
    def graphs(cls, weights: ModelWeights, kv: Sequence[torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor,
               key_step: int, capture: bool = True, slot_len: int | None = None) -> StepRunner:
        """Steps at power-of-two batch buckets and keys in multiples of `key_step`, as CUDA graphs."""
        num_slots, keys = pool_shape(kv)
        return cls(weights, kv, tokens, positions, batch_buckets(num_slots), key_buckets(keys, key_step),
                   capture=capture, argmax=True, slot_len=slot_len)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(B, key_len) of the steps kept: once captured, all of them, largest first."""
        return list(self._runs)

    def shape(self, prefix: int, longest: int) -> tuple[int, int]:
        """(batch bucket, key bucket) of a step over `prefix` slots whose longest row needs
        `longest` keys."""
        return (self.batch_sizes[bisect_left(self.batch_sizes, prefix)],
                self.key_lens[bisect_left(self.key_lens, min(longest, self.key_lens[-1]))])

    def run(self, prefix: int, longest: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """One step; -> (B, logits [B, V], greedy tokens [B] or None), views of buffers that the next
        step overwrites. No host sync."""
        b, key_len = self.shape(prefix, longest)
        got = self._runs.get((b, key_len))
        if got is None:  # eager only: a captured runner holds every shape
            if len(self._runs) >= EAGER_SHAPES:
                del self._runs[next(iter(self._runs))]  # the oldest made
            got = self._runs[b, key_len] = self._eager(b, key_len)
        run, logits = got
        run()
        return b, logits, self.greedy[:b] if self.argmax else None

    def _eager(self, b: int, key_len: int) -> tuple[Callable[[], None], torch.Tensor]:
        """A step at this shape, and the logits [B, V] it writes."""
        bufs = decode_buffers(self.weights.cfg, self.kv, self.scratch, b, key_len, self._rings)
        return (lambda: self._step(b, key_len, bufs)), bufs.logits

    def _step(self, b: int, key_len: int, bufs: DecodeBuffers) -> None:
        w, rings = self.weights, self._rings
        kvh = w.cfg.kv_heads
        positions = self.positions[:b]
        # [B*KVH] per distinct (ring, L), a ring's rows at their positions' entries
        made = {(ring, length): decode_write_index(self._offsets[length],
                                                   torch.remainder(positions, ring) if ring else positions, kvh)
                for ring, length in set(self._writes)}
        # per layer [B*KVH, 1, N]
        masks = decode_masks(positions, key_len, kvh, self.kv[0].dtype, self._key_index, w.cfg.windows, rings)
        logits = decode_step(w, self.tokens[:b], positions, bufs, [made[write] for write in self._writes],
                             masks)  # [B, V]
        if self.argmax:
            torch.argmax(logits, -1, out=self.greedy[:b])

    def _capture(self) -> None:
        """Largest shapes first, all in one memory pool: a smaller graph's blocks fit in what the
        larger ones freed, so the pool grows to about the largest step's working set."""
        shapes = [(b, k) for b in reversed(self.batch_sizes) for k in reversed(self.key_lens)]
        eager = {shape: self._eager(*shape) for shape in shapes}
        dev = self.kv[0].device
        with torch.inference_mode():
            # Warm-up on the stream the captures use, as torch.cuda.graph asks: the first run of a
            # shape loads its kernels, picks cuBLAS algorithms and makes the stream's cuBLAS
            # workspace, none of which may happen mid-capture. Its K/V writes land at each slot's
            # current position and are the values the next real step writes there.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for run, _ in eager.values():
                    run()
            pool = torch.cuda.graph_pool_handle()
            for shape, (run, logits) in eager.items():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    run()
                self._runs[shape] = graph.replay, logits
            torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)

