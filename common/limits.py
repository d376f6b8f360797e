"""Request limits derived from one place (DESIGN §6)."""

from __future__ import annotations

from dataclasses import dataclass


class ValidationError(ValueError):
    """A request the server refuses; the message says what was wrong and what the limit is."""


@dataclass(frozen=True)
class Limits:
    max_total_tokens: int  # a KV slot's length: prompt + generated tokens
    max_input_tokens: int
    prefill_token_budget: int  # tokens packed into one prefill pass; also the staging size

    @classmethod
    def derive(cls, n_positions: int, max_total_tokens: int = 0, max_input_tokens: int = 0,
               prefill_token_budget: int = 0) -> Limits:
        total = max_total_tokens or n_positions
        if total > n_positions:
            raise ValueError(f"max_total_tokens {total} exceeds the model's {n_positions} positions")
        max_input = max_input_tokens or total - 1
        if not 0 < max_input < total:
            raise ValueError(f"max_input_tokens {max_input} must be below max_total_tokens {total}")
        # A resumed request re-prefills its prompt plus what it generated: up to a whole slot.
        budget = max(prefill_token_budget, total)
        return cls(total, max_input, budget)

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise ValidationError("the prompt is empty: at least one token is needed")
        if prompt_len > self.max_input_tokens:
            raise ValidationError(
                f"the prompt has {prompt_len} tokens; at most {self.max_input_tokens} are allowed (max_input_tokens)"
            )
        if max_new_tokens < 1:
            raise ValidationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"exceeds max_total_tokens {self.max_total_tokens}"
            )
