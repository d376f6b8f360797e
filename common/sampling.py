"""Batched next-token choice: token biases, penalties, temperature, top-k / top-p / min-p / typical-p,
then Gumbel-max.

One call handles a whole prefill or decode batch with per-row parameters held in tensors; there
is no Python loop over rows and no host sync inside `sample`.

Randomness is counter based: the Gumbel noise of row b at vocab index v is a hash of
(seed[b], positions[b], v). A request therefore draws the same token whether it is sampled alone,
inside any batch, or after being resumed on another machine, as long as its logits are the same.
Filters are expressed per row as value thresholds (never as "the first n entries of a sort"), so
ties and unstable sorts cannot make a row's result depend on its neighbours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from .params import MAX_TOP_N, SamplingParams

_M32 = 0xFFFFFFFF
# lowbias32 (hash-prospector) multipliers. The second is > 2**31, so it is used as c - 2**32:
# same product mod 2**32, and x * c stays inside int64 for any 32-bit x (no reliance on overflow).
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
_SEED_SALT = 0x9E3779B9
# In a row whose frequency and presence penalties count the answer only (OpenAI's), a prompt token's
# count carries this mark: seen by the repetition penalty, which counts the prompt too, and masked off
# for the other two. Real counts stay below it: a request has far fewer than 2**24 tokens.
_PROMPT_MARK = 1 << 24


# Host mirror of the per-row tensors; its field names are the tensor field names.
_HOST_DTYPE = np.dtype(
    [
        ("temperature", np.float32),
        ("top_k", np.int64),
        ("top_p", np.float32),
        ("min_p", np.float32),
        ("typical_p", np.float32),
        ("repetition_penalty", np.float32),
        ("frequency_penalty", np.float32),
        ("presence_penalty", np.float32),
        ("seed", np.int64),
        ("greedy", np.bool_),
        ("n_bias", np.int32),  # host only: the row's logit_bias pairs
        ("answer_only", np.bool_),  # host only: its frequency and presence penalties skip the prompt
    ]
)
_TENSOR_FIELDS = _HOST_DTYPE.names[:-2]


def _host_row(p: SamplingParams) -> tuple:
    # Greedy rows get neutral temperature and filters so the batched math needs no per-row branch:
    # dividing by 1 and thresholds of -inf leave their (penalized) logits untouched.
    if p.greedy:
        return (1.0, 0, 1.0, 0.0, 1.0, p.repetition_penalty, p.frequency_penalty, p.presence_penalty, p.seed, True,
                len(p.logit_bias), not p.penalize_prompt)
    return (
        p.temperature,
        p.top_k,
        p.top_p,
        p.min_p,
        p.typical_p,
        p.repetition_penalty,
        p.frequency_penalty,
        p.presence_penalty,
        p.seed,
        False,
        len(p.logit_bias),
        not p.penalize_prompt,
    )


def _flags(host: np.ndarray) -> dict:
    return dict(
        all_greedy=bool(host["greedy"].all()),
        any_top_k=bool((host["top_k"] > 0).any()),
        max_top_k=int(host["top_k"].max(initial=0)),
        any_top_p=bool((host["top_p"] < 1).any()),
        any_min_p=bool((host["min_p"] > 0).any()),
        any_typical=bool((host["typical_p"] < 1).any()),
        any_penalty=bool(((host["repetition_penalty"] != 1) | (host["frequency_penalty"] != 0)
                          | (host["presence_penalty"] != 0)).any()),
        any_bias=bool(host["n_bias"].any()),
        any_answer_only=bool(host["answer_only"].any()),
    )


def _bias_table(rows: list[SamplingParams], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] token ids and [B, width] biases of the rows' logit_bias; padding adds 0 to token 0."""
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    values = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, p in enumerate(rows):
        if p.logit_bias:
            pairs = torch.tensor(p.logit_bias, dtype=torch.float64)  # [n, 2]: ids below 2**53 stay exact
            ids[i, : len(pairs)] = pairs[:, 0].long()
            values[i, : len(pairs)] = pairs[:, 1].float()
    return ids.to(device), values.to(device)


def _bias_width(n: int) -> int:
    # a power of two: a pool grows its table a few times at most
    return 1 << (n - 1).bit_length() if n else 0


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as [B] tensors on the logits' device, plus host-side flags.

    The flags let `sample` skip whole stages without reading the tensors back. Greedy rows are
    stored with temperature 1 and all filters off (see `_host_row`); `greedy` marks them.
    """

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    typical_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    seed: torch.Tensor  # [B] int64
    greedy: torch.Tensor  # [B] bool
    seed_key: torch.Tensor  # [B] int64, 32-bit hash of seed: hashed once here, not every step
    bias_ids: torch.Tensor  # [B, K] int64 token ids of each row's logit_bias, K its widest row's (padded)
    bias_values: torch.Tensor  # [B, K] float32 what each adds to its token's logit; 0 pads
    all_greedy: bool = True
    any_top_k: bool = False
    max_top_k: int = 0
    any_top_p: bool = False
    any_min_p: bool = False
    any_typical: bool = False
    any_penalty: bool = False
    any_bias: bool = False
    any_answer_only: bool = False
    _host: np.ndarray = field(default=None, repr=False, compare=False)
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def plain(self) -> bool:
        """Greedy with nothing applied: every row's token is its raw logits' argmax."""
        return self.all_greedy and not self.any_penalty and not self.any_bias

    @classmethod
    def build(cls, rows: list, device: torch.device | str) -> SamplingTensors:
        params = [SamplingParams.of(r) for r in rows]
        host = np.array([_host_row(p) for p in params], dtype=_HOST_DTYPE)
        tensors = {
            name: torch.from_numpy(host[name].copy()).to(device)  # copy: fields are strided
            for name in _TENSOR_FIELDS
        }
        keys = torch.tensor([_seed_key(int(s)) for s in host["seed"]], dtype=torch.int64).to(device)
        bias_ids, bias_values = _bias_table(params, _bias_width(int(host["n_bias"].max(initial=0))), device)
        return cls(**tensors, seed_key=keys, bias_ids=bias_ids, bias_values=bias_values, **_flags(host), _host=host)

    @classmethod
    def empty(cls, n: int, device: torch.device | str) -> SamplingTensors:
        """A pool of n greedy rows, to be filled with `set_row` as requests are admitted."""
        return cls.build([SamplingParams()] * n, device)

    def set_row(self, i: int, params: Any) -> None:
        """Write one request's parameters into row i in place (host side: a few scalar fills)."""
        p = SamplingParams.of(params)
        row = _host_row(p)
        had_bias = self._host["n_bias"][i]
        self._host[i] = row
        for name, value in zip(_TENSOR_FIELDS, row):
            getattr(self, name)[i] = value
        self.seed_key[i] = _seed_key(int(self._host["seed"][i]))
        if p.logit_bias or had_bias:
            self._set_bias(i, p)
        for name, value in _flags(self._host).items():
            setattr(self, name, value)
        self._views.clear()

    def _set_bias(self, i: int, p: SamplingParams) -> None:
        grow = _bias_width(len(p.logit_bias)) - self.bias_ids.shape[1]
        if grow > 0:  # pads add 0 to token 0
            self.bias_ids = torch.nn.functional.pad(self.bias_ids, (0, grow))
            self.bias_values = torch.nn.functional.pad(self.bias_values, (0, grow))
        ids, values = _bias_table([p], self.bias_ids.shape[1], self.bias_ids.device)
        self.bias_ids[i], self.bias_values[i] = ids[0], values[0]

    def view(self, b: int) -> SamplingTensors:
        """The first b rows: tensor views (no copies) with flags for just those rows. Kept until
        the next set_row, since a decode loop asks for the same b step after step."""
        cached = self._views.get(b)
        if cached is None:
            host = self._host[:b]
            names = (*_TENSOR_FIELDS, "seed_key", "bias_ids", "bias_values")
            tensors = {name: getattr(self, name)[:b] for name in names}
            cached = self._views[b] = SamplingTensors(**tensors, **_flags(host), _host=host)
        return cached


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32
    top_ids: torch.Tensor | None = None  # [B, n] int64
    top_logprobs: torch.Tensor | None = None  # [B, n] float32


def sample(
    logits: torch.Tensor,
    st: SamplingTensors,
    positions: torch.Tensor,
    token_counts: torch.Tensor | None = None,
    want_logprobs: bool | None = False,
    top_n: int = 0,
) -> SampleOutput:
    """Choose one token per row of logits [B, V].

    positions: [B] integer, absolute position of the token being chosen (seeds the noise).
    token_counts: [B, V] counts of tokens seen so far (init_token_counts), read only when
    st.any_penalty.
    want_logprobs: Python bool, True when any row wants details; they are then computed for every
    row. Logprobs are log-softmax of the processed logits (after biases, penalties, temperature and
    filters, as TGI reports them) at the chosen token; top_n (<= 5) adds the n best of those.
    """
    if not 0 <= top_n <= MAX_TOP_N:
        raise ValueError(f"top_n must be in [0, {MAX_TOP_N}], got {top_n}")
    details = bool(want_logprobs) or top_n > 0
    if st.plain and not details:
        return SampleOutput(logits.argmax(dim=-1))
    scores = process_logits(logits, st, token_counts)  # [B, V] float32
    logprobs = scores.log_softmax(dim=-1) if details else None  # [B, V]
    if not st.all_greedy:
        scores = _add_gumbel(scores, st, positions)
    tokens = scores.argmax(dim=-1)  # [B]
    return _with_details(tokens, logprobs, top_n)


def process_logits(
    logits: torch.Tensor, st: SamplingTensors, token_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits after token biases (first, as vLLM and llama.cpp apply them), penalties,
    temperature, top-k, top-p, min-p and typical-p (filtered = -inf), in transformers' order.

    May return `logits` itself when it is float32 and nothing applies; never writes into it.
    """
    scores = logits.float()  # [B, V]
    if st.any_bias:
        scores = scores.scatter_add(1, st.bias_ids, st.bias_values)  # a fresh tensor
    if st.any_penalty:
        if token_counts is None:
            raise ValueError("token_counts is required when a row has a penalty")
        scores = _penalize(scores, st, token_counts)
    if st.all_greedy:
        # Greedy rows carry no temperature or filters (see _host_row).
        return scores
    scores = scores / st.temperature[:, None]  # a fresh tensor: the filters below work in place
    if st.any_top_k:
        _top_k_(scores, st.top_k, st.max_top_k)
    if st.any_top_p:
        _top_p_(scores, st.top_p)
    if st.any_min_p:
        _min_p_(scores, st.min_p)
    if st.any_typical:
        _typical_(scores, st.typical_p)
    return scores


def _penalize(scores: torch.Tensor, st: SamplingTensors, counts: torch.Tensor) -> torch.Tensor:
    # Repetition penalty as transformers' RepetitionPenaltyLogitsProcessor (penalty 1 is exact
    # identity) over every token seen, then frequency and presence penalties as OpenAI's
    # logit -= frequency * count + presence * (count > 0) over the counts without the prompt's mark.
    rep = st.repetition_penalty[:, None]  # [B, 1]
    seen = counts > 0  # [B, V]
    penalized = torch.where(scores < 0, scores * rep, scores / rep)  # [B, V]
    scores = torch.where(seen, penalized, scores)
    if st.any_answer_only:  # else no count carries the mark: two [B, V] passes saved
        counts = counts & (_PROMPT_MARK - 1)  # [B, V]
        seen = counts > 0
    scores.sub_(counts * st.frequency_penalty[:, None])
    return scores.sub_(seen * st.presence_penalty[:, None])


def _top_k_(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    # One topk with the batch's largest k; each row keeps values >= its own k-th largest value
    # (ties kept, as transformers' TopKLogitsWarper). Rows with top_k == 0 get a -inf threshold.
    k = min(max_top_k, scores.shape[-1])
    best = scores.topk(k, dim=-1).values  # [B, k] descending
    kth = best.gather(1, (top_k.clamp(1, k) - 1)[:, None])  # [B, 1]
    kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
    scores.masked_fill_(scores < kth, float("-inf"))


def _top_p_(scores: torch.Tensor, top_p: torch.Tensor) -> None:
    # transformers' TopPLogitsWarper drops the ascending-sorted prefix whose cumulative mass is
    # <= 1 - top_p, always keeping the largest. We turn that prefix into a value threshold so the
    # (unstable) order of tied values cannot matter.
    ascending = scores.sort(dim=-1).values  # [B, V]
    cum = ascending.softmax(dim=-1).cumsum_(dim=-1)  # [B, V]
    cut = torch.where(top_p < 1, 1 - top_p, -1.0)[:, None]  # [B, 1]; -1 removes nothing
    # cum is non-decreasing, so a binary search counts the entries <= cut without a [B, V] pass.
    n_drop = torch.searchsorted(cum, cut, right=True).clamp_(max=scores.shape[-1] - 1)  # [B, 1]
    scores.masked_fill_(scores < ascending.gather(1, n_drop), float("-inf"))


def _min_p_(scores: torch.Tensor, min_p: torch.Tensor) -> None:
    # transformers' MinPLogitsWarper keeps the tokens whose probability is at least min_p times
    # the largest one's: on the logits, those within log(min_p) of the largest (no softmax needed).
    # min_p 0 gives a -inf threshold; the largest is always kept.
    cut = scores.amax(dim=-1, keepdim=True) + min_p.log()[:, None]  # [B, 1]
    scores.masked_fill_(scores < cut, float("-inf"))


def _typical_(scores: torch.Tensor, typical_p: torch.Tensor) -> None:
    # transformers' TypicalLogitsWarper: rank tokens by |-log p - entropy| and keep the smallest
    # distances until their mass reaches typical_p (at least one token). Its mask is already a
    # threshold on that distance.
    logp = scores.log_softmax(dim=-1)  # [B, V]
    p = logp.exp()
    entropy = -(logp * p).nansum(dim=-1, keepdim=True)  # [B, 1]; nansum: -inf * 0 for filtered
    distance = logp.add_(entropy).abs_()  # [B, V] == |-log p - entropy|
    by_distance, order = distance.sort(dim=-1)  # [B, V]
    cum = p.gather(1, order).cumsum_(dim=-1)
    last = torch.searchsorted(cum, typical_p[:, None]).clamp_(max=scores.shape[-1] - 1)  # [B, 1]
    limit = by_distance.gather(1, last)  # [B, 1]
    limit = torch.where(typical_p[:, None] < 1, limit, float("inf"))
    scores.masked_fill_(distance > limit, float("-inf"))


def _add_gumbel(scores: torch.Tensor, st: SamplingTensors, positions: torch.Tensor) -> torch.Tensor:
    # argmax(scores + g) with g = -log(-log u) draws from softmax(scores) (Gumbel-max).
    # Greedy rows get g * 0, i.e. plain argmax. Written into the noise buffer; scores is kept.
    log_e = _neg_gumbel(st.seed_key, positions, scores.shape[-1])  # [B, V] == -g
    sampled = (~st.greedy).to(scores.dtype)[:, None]  # [B, 1]
    return torch.addcmul(scores, log_e, sampled, value=-1.0, out=log_e)


def _neg_gumbel(seed_key: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(-log u) for u = hash(seed[b], positions[b], v) in (0, 1): [B, V] float32."""
    # Mixing the position into the seed's key is a bijection, so one seed's positions never share
    # a key; the vocab hashes are distinct too, so noise inputs never repeat within a row.
    row_keys = _mix32_(seed_key ^ (positions.long() & _M32))  # [B]; int32 positions welcome
    h = row_keys[:, None] ^ _vocab_hash(vocab, seed_key.device)[None, :]  # [B, V]
    scratch = torch.empty_like(h)
    _mix32_(h, scratch)
    # 23 bits, centred: (m + 0.5) / 2**23 is exact in float32 and never 0 or 1.
    u = torch.bitwise_right_shift(h, 9, out=scratch).float().add_(0.5).mul_(2.0**-23)
    return u.log_().neg_().log_()


def _seed_key(seed: int) -> int:
    """A seed's 32-bit key, from both halves of its 64 bits: made on the host once per request,
    where the same hash over a one-element tensor took ~20 tensor ops (each a kernel on a GPU)."""
    key = _mix32((seed & _M32) ^ _SEED_SALT)
    return _mix32(key ^ (seed >> 32))  # >>: arithmetic, as on int64 tensors


def _mix32(x: int) -> int:
    """`_mix32_` on one Python int: the same low 32 bits, for an x of any sign."""
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=8)
def _vocab_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """[V] distinct 32-bit values."""
    return _mix32_(torch.arange(vocab, dtype=torch.int64, device=device))


def _mix32_(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32), in place.

    Shifts go into one reused buffer: on CPU, fresh [B, V] temporaries cost page faults.
    """
    scratch = torch.empty_like(x) if scratch is None else scratch
    x ^= torch.bitwise_right_shift(x, 16, out=scratch)
    x *= _MUL1
    x &= _M32
    x ^= torch.bitwise_right_shift(x, 15, out=scratch)
    x *= _MUL2
    x &= _M32
    x ^= torch.bitwise_right_shift(x, 16, out=scratch)
    return x


def _with_details(tokens: torch.Tensor, logprobs: torch.Tensor | None, top_n: int) -> SampleOutput:
    if logprobs is None:
        return SampleOutput(tokens)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
    if top_n == 0:
        return SampleOutput(tokens, chosen)
    top_logprobs, top_ids = logprobs.topk(top_n, dim=-1)  # [B, n]
    return SampleOutput(tokens, chosen, top_ids, top_logprobs)


def init_token_counts(ids: list[int], answer_from: int, penalize_prompt: bool, vocab: int,
                      device: torch.device | str, last_n: int = 0) -> torch.Tensor:
    """[V] int32 counts of one row's tokens so far, for the penalties: `ids` are the prompt's and,
    from `answer_from` on, the answer's (a resumed request's, its first token); `last_n` > 0: of
    the last that many only (penalty_last_n, which counts the prompt's). Where the frequency and
    presence penalties count the answer only (not `penalize_prompt`), a prompt token holds
    _PROMPT_MARK (plus its count in the answer)."""
    if last_n:
        ids, answer_from = ids[-last_n:], 0
    counts = torch.zeros(vocab, dtype=torch.int32, device=device)
    prompt = torch.tensor(ids[:answer_from], dtype=torch.int64, device=device)
    answer = torch.tensor(ids[answer_from:], dtype=torch.int64, device=device)
    if penalize_prompt:
        counts.index_add_(0, prompt, torch.ones_like(prompt, dtype=torch.int32))
    else:
        counts.index_fill_(0, prompt, _PROMPT_MARK)
    return counts.index_add_(0, answer, torch.ones_like(answer, dtype=torch.int32))


def update_token_counts(counts: torch.Tensor, rows_tokens: torch.Tensor) -> torch.Tensor:
    """Count each row's new token: counts [B, V] += one_hot(rows_tokens [B]), in place."""
    index = rows_tokens[:, None]  # [B, 1]
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))


def slide_token_counts(counts: torch.Tensor, recent: torch.Tensor, windows: torch.Tensor, rows_tokens: torch.Tensor,
                       positions: torch.Tensor) -> None:
    """Before each row's new token (at `positions` [B]) is counted: a row with a window of n
    (`windows` [B], 0: none) uncounts the token n back, which `recent` [B, >= n] holds at its
    position mod n, and keeps the new one there in its place; in place."""
    windowed = windows > 0  # [B]
    at = torch.where(windowed, positions % windows.clamp(min=1), 0)[:, None]  # [B, 1]
    leaving = recent.gather(1, at).long()  # [B, 1]: the token at position - n, once there is one
    gone = (windowed & (positions >= windows)).to(counts.dtype)[:, None]  # [B, 1]
    counts.scatter_add_(1, leaving, -gone)
    recent.scatter_(1, at, torch.where(windowed, rows_tokens, leaving[:, 0]).to(recent.dtype)[:, None])
