"""Batched decoding over the static KV pool.

A step runs over the pool's contiguous prefix of slots up to the highest one in use; free slots
inside it are rows that compute at position 0 of their own (free) slot and are ignored. Nothing
ever moves or gathers another request's KV. Every per-row decision (next token, stop tokens,
length limits) is a tensor op, and the step ends in exactly one host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.common.loading import LoadedModel
from splitserve.common.model import kv_rings, layer_keys
from splitserve.common.params import STOP_IDS_PER_REQUEST, Finish, SamplingParams
from splitserve.common.request import GenerateRequest
from splitserve.common.sampling import (
    SampleOutput,
    SamplingTensors,
    init_token_counts,
    sample,
    slide_token_counts,
    update_token_counts,
)

from .kv_pool import SlotAllocator, allocate_pool
from .step_runner import StepRunner

GREEDY = SamplingParams()


@dataclass
class StepOutput:
    """Results for the rows that were active when the step began (slot order)."""

    slots: list[int]
    ids: list[str]  # their requests
    tokens: list[int]
    finish: list[int]
    logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class DecodeEngine:
    def __init__(self, model: LoadedModel, num_slots: int, slot_len: int, key_bucket: int = 8, graphs: bool = False,
                 graph_key_step: int = 256):
        cfg, dev = model.cfg, model.device
        if slot_len > cfg.n_positions:
            raise ValueError(f"slot length {slot_len} exceeds the model's {cfg.n_positions} positions")
        if graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {dev}")
        self.model = model
        self.num_slots, self.slot_len, self.key_bucket = num_slots, slot_len, key_bucket
        self.kv = allocate_pool(cfg, num_slots, layer_keys(kv_rings(cfg.windows, slot_len), slot_len), model.dtype, dev)
        self.slots = SlotAllocator(num_slots)
        # Per-slot state, read by the step as views of the first B rows.
        self.tokens = torch.zeros(num_slots, dtype=torch.long, device=dev)  # newest token
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=dev)  # its position
        # Position of the last allowed token; free rows hold slot_len, so they never finish.
        self.end_pos = torch.full((num_slots,), slot_len, dtype=torch.long, device=dev)
        # The first columns hold the model's end-of-sequence ids (-1 when ignored), the rest the
        # request's stop ids; -1 pads.
        eos = len(cfg.eos_token_ids)
        self.stop_ids = torch.full((num_slots, eos + STOP_IDS_PER_REQUEST), -1, dtype=torch.long, device=dev)
        self.stop_codes = torch.tensor([Finish.EOS] * eos + [Finish.STOP_TOKEN] * STOP_IDS_PER_REQUEST, device=dev)
        self.active = torch.zeros(num_slots, dtype=torch.long, device=dev)  # 0/1: added to positions
        self.sampling = SamplingTensors.empty(num_slots, dev)
        self.token_counts: torch.Tensor | None = None  # [S, V], made when a request needs penalties
        # Rows whose penalties count their last n tokens only (penalty_last_n): n, else 0; and
        # [S, >= n] int32 their last n tokens, each at its position mod n (made when one comes)
        self.windows = torch.zeros(num_slots, dtype=torch.long, device=dev)
        self.recent: torch.Tensor | None = None
        self._windowed: set[int] = set()
        # Host mirrors, so that choosing B and the key bucket needs no sync.
        self.requests: dict[int, GenerateRequest] = {}
        self._offset: dict[int, int] = {}  # slot -> its position minus the step counter
        self._steps = 0
        self._details = 0  # active requests that want logprobs or top tokens
        # Made last: CUDA graphs capture steps that read the state above.
        self.runner = self.make_runner(graph_key_step if graphs else None)

    def make_runner(self, graph_key_step: int | None) -> StepRunner:
        """Steps over this engine's pool and state: CUDA graphs at bucketed shapes with keys in
        multiples of `graph_key_step`, or (None) eager steps over the exact slot prefix."""
        w = self.model.weights
        if graph_key_step is None:
            return StepRunner.exact(w, self.kv.layers, self.tokens, self.positions, self.key_bucket, self.slot_len)
        return StepRunner.graphs(w, self.kv.layers, self.tokens, self.positions, graph_key_step, slot_len=self.slot_len)

    @property
    def free_slots(self) -> int:
        return self.slots.free_count

    def admit(self, request: GenerateRequest, kv: torch.Tensor, first_token: int) -> int:
        """Copy a prompt's KV ([n_layer, 2, n, KVH, D]) into the lowest free slot; the slot then
        decodes from `first_token`, which sits at position n."""
        return self.admit_with(request, kv.shape[2], first_token,
                               lambda dst, skip, layers: dst.copy_(kv[layers, :, skip:].transpose(2, 3)))

    def admit_with(self, request: GenerateRequest, n: int, first_token: int, fill) -> int:
        """As `admit`, the KV of the prompt's n tokens written by `fill(dst, skip, layers)` into the
        slot's [n, 2, KVH, n - skip, D] view of the model's `layers` (a slice; a NIXL read lands
        there directly), run by run of each group of the pool (kv_pool.allocate_pool): all of them,
        or in a windowed layer's ring the last ring of them, skipping the first `skip`, then turned
        so that position p sits at p % ring. A fill that raises gives the slot back, unless the
        error says the slot may still be written to (`slot_unsafe`): such a slot is never handed out
        again."""
        if n + request.max_new_tokens > self.slot_len:
            raise ValueError(f"{n} prompt + {request.max_new_tokens} new tokens exceed the slot length {self.slot_len}")
        if len(request.stop_token_ids) > STOP_IDS_PER_REQUEST:
            raise ValueError(f"at most {STOP_IDS_PER_REQUEST} stop token ids are supported")
        slot = self.slots.take()
        try:
            for group in self.kv.groups:
                keys = group.kv.shape[4]
                skip = max(0, n - keys)
                for layers, at in group.runs:
                    fill(group.kv[at, :, slot, :, : n - skip], skip, layers)
                if skip:  # a ring's last keys in order from its start: position p to p % ring
                    held = group.kv[:, :, slot]
                    held.copy_(held.roll(n % keys, -2))
        except BaseException as e:
            if not getattr(e, "slot_unsafe", False):
                self.slots.give_back(slot)
            raise
        self.tokens[slot] = first_token
        self.positions[slot] = n
        # The first token (at position n) was the first of max_new_tokens.
        self.end_pos[slot] = min(n + request.max_new_tokens - 1, self.slot_len - 1)
        eos = self.model.cfg.eos_token_ids
        stops = [*([-1] * len(eos) if request.ignore_eos else eos), *request.stop_token_ids]
        self.stop_ids[slot] = torch.tensor(stops + [-1] * (self.stop_ids.shape[1] - len(stops)))
        self.sampling.set_row(slot, request.sampling)
        if self.sampling.any_penalty:
            self._init_counts(slot, request, first_token)
        self.active[slot] = 1
        self.requests[slot] = request
        self._offset[slot] = n - self._steps
        self._details += request.wants_details
        return slot

    def _init_counts(self, slot: int, request: GenerateRequest, first_token: int) -> None:
        vocab = self.model.cfg.vocab_size
        if self.token_counts is None:
            self.token_counts = torch.zeros(self.num_slots, vocab, dtype=torch.int32, device=self.model.device)
        ids = [*request.prompt_ids, first_token]
        answer_from = len(request.prompt_ids) - request.resumed
        last_n = request.sampling.penalty_last_n if request.sampling.penalty_last_n < self.slot_len else 0
        self.token_counts[slot] = init_token_counts(ids, answer_from, request.sampling.penalize_prompt, vocab,
                                                    self.model.device, last_n)
        if last_n:
            self._keep_recent(slot, ids, last_n)

    def _keep_recent(self, slot: int, ids: list[int], n: int) -> None:
        """The row's last n tokens, each at its position mod n, for slide_token_counts."""
        width = 0 if self.recent is None else self.recent.shape[1]
        if n > width:
            self.recent = torch.zeros(self.num_slots, max(n, 2 * width), dtype=torch.int32, device=self.model.device) \
                if self.recent is None else torch.nn.functional.pad(self.recent, (0, max(n, 2 * width) - width))
        positions = range(max(0, len(ids) - n), len(ids))
        self.recent[slot, [q % n for q in positions]] = torch.tensor([ids[q] for q in positions], dtype=torch.int32)
        self.windows[slot] = n
        self._windowed.add(slot)

    def release(self, slot: int) -> None:
        """Free a slot (finished, cancelled or stopped by a stop string)."""
        request = self.requests.pop(slot)
        self._offset.pop(slot)
        self._details -= request.wants_details
        self.active[slot] = 0
        self.tokens[slot] = 0
        self.positions[slot] = 0
        self.end_pos[slot] = self.slot_len
        self.stop_ids[slot] = -1
        if slot in self._windowed:
            self._windowed.discard(slot)
            self.windows[slot] = 0
        self.sampling.set_row(slot, GREEDY)  # so a free row never forces the sampled path
        self.slots.give_back(slot)

    def longest(self) -> int:
        """Keys the longest active row attends this step (its position + 1)."""
        return max(self._offset.values()) + self._steps + 1

    def step(self) -> StepOutput:
        if not self.requests:
            return StepOutput([], [], [], [])
        b, logits, greedy = self.runner.run(self.slots.prefix_len(), self.longest())  # [B, V], [B] or None
        active = self.active[:b]
        positions = self.positions[:b]
        counts = self.token_counts[:b] if self.token_counts is not None else None
        top_n = max((r.top_n_tokens for r in self.requests.values()), default=0) if self._details else 0
        next_pos = positions + 1
        st = self.sampling.view(b)
        if greedy is not None and st.plain and not self._details:
            out = SampleOutput(greedy)  # the graph's argmax: what sample's greedy fast path computes
        else:
            out = sample(logits, st, next_pos, counts, bool(self._details), top_n)
        new = out.tokens  # [B]
        finish = self._finish_codes(new, next_pos, b)
        if counts is not None:
            if self._windowed:
                slide_token_counts(counts, self.recent[:b], self.windows[:b], new, next_pos)
            update_token_counts(counts, new)
        # Free rows stay at position 0; finished rows are reset by release() after the sync.
        self.tokens[:b] = new
        positions.add_(active)
        self._steps += 1
        return self._collect(out, new, finish)

    def _finish_codes(self, new: torch.Tensor, next_pos: torch.Tensor, b: int) -> torch.Tensor:
        """Free rows finish never: their stop ids are -1 and their end lies past the slot."""
        stop = ((new[:, None] == self.stop_ids[:b]) * self.stop_codes).amax(-1)  # [B]
        # Stop codes outrank Finish.LENGTH, so the larger code is the reason.
        return torch.maximum(stop, (next_pos >= self.end_pos[:b]) * Finish.LENGTH)

    def _collect(self, out, new: torch.Tensor, finish: torch.Tensor) -> StepOutput:
        slots = sorted(self.requests)
        if out.logprobs is None:
            tokens, codes = torch.stack((new, finish)).tolist()  # the step's one host sync
            result = StepOutput(slots, [self.requests[s].id for s in slots], [tokens[s] for s in slots],
                                [codes[s] for s in slots])
        else:
            result = self._collect_details(slots, out, new, finish)
        for s, code in zip(result.slots, result.finish):
            if code != Finish.NONE:
                self.release(s)
        return result

    def _collect_details(self, slots: list[int], out, new: torch.Tensor, finish: torch.Tensor) -> StepOutput:
        # Token ids are exact in float32 (< 2**24), so one float tensor carries everything.
        parts = [new.float()[:, None], finish.float()[:, None], out.logprobs.float()[:, None]]
        n = 0 if out.top_ids is None else out.top_ids.shape[1]
        if n:
            parts += [out.top_ids.float(), out.top_logprobs.float()]
        rows = torch.cat(parts, 1).tolist()  # the step's one host sync
        picked = [rows[s] for s in slots]
        return StepOutput(
            slots,
            [self.requests[s].id for s in slots],
            [int(r[0]) for r in picked],
            [int(r[1]) for r in picked],
            [r[2] for r in picked],
            [[int(t) for t in r[3 : 3 + n]] for r in picked] if n else None,
            [r[3 + n : 3 + 2 * n] for r in picked] if n else None,
        )
