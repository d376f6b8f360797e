"""Packed variable-length prefill: many prompts in one forward, the LM head only where needed.

Each batch's KV lands in a staging buffer owned by this engine, ready for handoff to a decode
slot; the first token is sampled here with each request's own parameters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from splitserve.common.attention import PrefillAttention, choose_prefill_attention
from splitserve.common.loading import LoadedModel
from splitserve.common.model import prefill
from splitserve.common.model_config import long_rope_prompt
from splitserve.common.request import GenerateRequest
from splitserve.common.sampling import SamplingTensors, init_token_counts, sample


@dataclass
class PrefillResult:
    request: GenerateRequest
    first_token: int
    kv_offset: int  # the prompt's KV is staging[:, :, kv_offset : kv_offset + kv_len]
    kv_len: int
    cached: int = 0  # of its tokens, how many were staged before (a prefix cache hit; earlier pieces), not computed
    logprob: float | None = None
    top_tokens: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None  # None for the first prompt token


def take_batch(queue: deque, budget: int, prompt_len=lambda r: len(r.prompt_ids)) -> list:
    """Pop requests in arrival order while their prompts fit the token budget."""
    batch, used = [], 0
    while queue and used + prompt_len(queue[0]) <= budget:
        used += prompt_len(queue[0])
        batch.append(queue.popleft())
    return batch


class PrefillEngine:
    def __init__(self, model: LoadedModel, token_budget: int, attn: PrefillAttention | None = None,
                 staging: torch.Tensor | None = None):
        cfg = model.cfg
        self.model = model
        self.token_budget = token_budget
        if attn is None:
            self.attn_name, self.attn = choose_prefill_attention(model.device, cfg.prefill_width,
                                                                 softcap=bool(cfg.attn_softcap), sinks=cfg.attn_sinks)
        else:
            self.attn_name, self.attn = "custom", attn
        # [n_layer, 2, >= budget, KVH, D]: prompts' KV packed back to back. A worker passes one
        # its KV transport can export; the in-process engine owns a plain one.
        if staging is None:
            staging = torch.empty(cfg.n_layer, 2, token_budget, cfg.kv_heads, cfg.head_dim, dtype=model.dtype,
                                  device=model.device)
        self.staging = staging

    def run(self, batch: list[GenerateRequest], staging_offset: int = 0,
            forks: list[list[GenerateRequest]] | None = None, past: list[int] | None = None) -> list[PrefillResult]:
        """Results in batch order, each prompt's forks (same prompt, own sampling) right after it;
        a fork's result shares its prompt's KV region. `past`: per prompt, the tokens of a cached
        prefix whose K/V are already at the start of its staging region (from the prefix cache):
        only the rest is computed. A prompt that asks for prompt logprobs has none."""
        lens = [len(r.prompt_ids) for r in batch]
        past = past or [0] * len(batch)
        if any(p and r.prompt_logprobs for r, p in zip(batch, past)):
            raise ValueError("prompt logprobs need every prompt token computed: no cached prefix")
        new = [n - p for n, p in zip(lens, past)]  # the tokens computed now
        total = sum(lens)
        if sum(new) > self.token_budget or staging_offset + total > self.staging.shape[2]:
            raise ValueError(f"{sum(new)} prompt tokens to compute ({total} in all) at offset {staging_offset} do not "
                             f"fit the budget ({self.token_budget}) or the staging buffer ({self.staging.shape[2]})")
        dev = self.model.device
        flat = torch.tensor([t for r, p in zip(batch, past) for t in r.prompt_ids[p:]], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(p, n) for n, p in zip(lens, past)]).to(dev)
        index, last_rows = self._logit_rows(batch, new)
        logits = prefill(self.model.weights, flat, positions, new, self.attn,
                         kv_out=self.staging[:, :, staging_offset:], logit_index=index, past=past,
                         rope_rows=self._rope_rows(batch, positions, new))
        last = logits if last_rows is None else logits[last_rows]  # [B, V]
        # one sampled row per request: a prompt's row repeated for each of its forks
        group = [i for i, fs in enumerate(forks or [[]] * len(batch)) for _ in range(1 + len(fs))]
        rows = [req for i, leader in enumerate(batch) for req in (leader, *(forks[i] if forks else ()))]
        if len(rows) > len(batch):
            last = last[group]  # [R, V]
        st = SamplingTensors.build([r.sampling for r in rows], dev)
        counts = self._prompt_counts(rows) if st.any_penalty else None
        details = any(r.wants_details for r in rows)
        top_n = max(r.top_n_tokens for r in rows)
        out = sample(last, st, torch.tensor([lens[i] for i in group], device=dev), counts, details, top_n)
        starts = (torch.tensor(lens).cumsum(0) - torch.tensor(lens)).tolist()
        results = [PrefillResult(r, 0, staging_offset + starts[i], lens[i], past[i]) for r, i in zip(rows, group)]
        self._fill_tokens(results, out)
        if last_rows is not None:
            leaders = [k for k, i in enumerate(group) if k == 0 or group[k - 1] != i]
            self._fill_prompt_logprobs([results[k] for k in leaders], logits, last_rows)
            for res, i in zip(results, group):
                res.prompt_logprobs = results[leaders[i]].prompt_logprobs if res.request.prompt_logprobs else None
        return results

    def extend(self, request: GenerateRequest, staging_offset: int, past: int, upto: int) -> None:
        """A piece of a prompt prefilled over several passes: the K/V of its tokens [past, upto),
        after those of its first `past` tokens, already at staging[:, :, staging_offset:]. Nothing
        reaches the LM head; the last piece is `run` with `past`, which samples the first token."""
        if upto - past > self.token_budget or staging_offset + upto > self.staging.shape[2]:
            raise ValueError(f"a piece of {upto - past} tokens at offset {staging_offset} + {past} does not fit the "
                             f"budget ({self.token_budget}) or the staging buffer ({self.staging.shape[2]})")
        dev = self.model.device
        ids = torch.tensor(request.prompt_ids[past:upto], dtype=torch.long, device=dev)  # [n]
        positions = torch.arange(past, upto, device=dev)
        prefill(self.model.weights, ids, positions, [upto - past], self.attn,
                kv_out=self.staging[:, :, staging_offset:], logit_index=torch.empty(0, dtype=torch.long, device=dev),
                past=[past], rope_rows=self._rope_rows([request], positions, [upto - past]))

    def _rope_rows(self, batch, positions: torch.Tensor, new: list[int]) -> torch.Tensor | None:
        """[T] rows of the rotary tables of the packed tokens where a prompt's differ from their
        positions (long_rope_prompt), else None."""
        cfg = self.model.cfg
        long = [long_rope_prompt(cfg, len(r.prompt_ids) - r.resumed) for r in batch]
        if not any(long):
            return None
        shift = torch.tensor([cfg.n_positions * x for x in long]).repeat_interleave(torch.tensor(new))  # [T]
        return positions + shift.to(positions.device)

    def _logit_rows(self, batch, new: list[int]):
        """Rows of the packed new tokens that reach the LM head: the last of each prompt, or every
        position of a prompt whose prompt logprobs were asked for."""
        if not any(r.prompt_logprobs for r in batch):
            return None, None
        rows, last_rows, end = [], [], 0
        for r, n in zip(batch, new):
            end += n
            rows.extend(range(end - n, end) if r.prompt_logprobs else [end - 1])
            last_rows.append(len(rows) - 1)
        return torch.tensor(rows, device=self.model.device), last_rows

    def _prompt_counts(self, batch) -> torch.Tensor:
        vocab, dev = self.model.cfg.vocab_size, self.model.device
        return torch.stack([init_token_counts(list(r.prompt_ids), len(r.prompt_ids) - r.resumed,
                                              r.sampling.penalize_prompt, vocab, dev, r.sampling.penalty_last_n)
                            for r in batch])

    @staticmethod
    def _fill_tokens(results: list[PrefillResult], out) -> None:
        tokens = out.tokens.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, res in enumerate(results):
            res.first_token = tokens[i]
            if logprobs is not None and res.request.wants_details:
                res.logprob = logprobs[i]
                n = res.request.top_n_tokens
                if n and top_ids is not None:
                    res.top_tokens = list(zip(top_ids[i][:n], top_lps[i][:n]))

    @staticmethod
    def _fill_prompt_logprobs(results, logits, last_rows) -> None:
        """logprob of each prompt token given the ones before it (the first has none)."""
        start_row = 0
        for res, last in zip(results, last_rows):
            if res.request.prompt_logprobs:
                ids = torch.tensor(res.request.prompt_ids[1:], device=logits.device)
                lp = torch.log_softmax(logits[start_row:last].float(), -1)  # [n-1, V]
                picked = lp.gather(1, ids[:, None])[:, 0].tolist()
                res.prompt_logprobs = [None] + picked
            start_row = last + 1
