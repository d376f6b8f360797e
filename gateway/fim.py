"""Fill-in-the-middle prompts in StarCoder's PSM order: <prefix> prefix <suffix> suffix <middle>.

The markers are the checkpoint's own tokens in whichever spelling it knows (StarCoder's
`<fim_prefix>`, SantaCoder's `<fim-prefix>`). A prompt too long for the room left is cut at its
far ends, the code nearest the cursor kept: the prefix loses its start, the suffix its end, and
the middle marker, which the model continues from, always stays last.
"""

from __future__ import annotations

from splitserve.common.tokenizer import fim_token_ids

from .api_errors import invalid

MARKERS = 3


def fim_prompt(tokenizer, prefix: list[int], suffix: list[int], room: int) -> list[int]:
    """The prompt's ids: at most `room` of them, or just the markers when even those don't fit (the
    request's limit check then says why)."""
    fim = fim_token_ids(tokenizer)
    if fim is None:
        raise invalid("`suffix` (fill-in-the-middle) needs a tokenizer with FIM tokens (<fim_prefix>, <fim_suffix>, "
                      "<fim_middle> or SantaCoder's <fim-prefix>...); this model's has none", "suffix")
    keep_prefix, keep_suffix = split_room(len(prefix), len(suffix), max(room - MARKERS, 0))
    return [fim["prefix"], *prefix[len(prefix) - keep_prefix:], fim["suffix"], *suffix[:keep_suffix], fim["middle"]]


def split_room(n_prefix: int, n_suffix: int, room: int) -> tuple[int, int]:
    """How many prefix and suffix tokens fit in `room`: all when they can; otherwise the suffix gets
    at most half (less when the prefix leaves more), the prefix the rest."""
    if n_prefix + n_suffix <= room:
        return n_prefix, n_suffix
    keep_suffix = min(n_suffix, max(room // 2, room - n_prefix))
    return min(n_prefix, room - keep_suffix), keep_suffix
