"""What the fuzz tests share: a cluster with short limits (every accepted request ends quickly), and
a client that streams good requests for as long as the fuzzing runs and checks each of them."""

from __future__ import annotations

import threading

from hypothesis import HealthCheck, Phase, settings

from cluster import wait_for
from splitserve.client import Client

MAX_TOTAL_TOKENS = 96  # an accepted fuzz request generates at most this many tokens
MAX_CONCURRENT = 32
PROMPT = "def fibonacci(n):\n    "
GOOD_TOKENS = MAX_TOTAL_TOKENS - 16

# Steady in CI: the same examples every run, none remembered between runs, no time limits on a
# loaded 2-core machine, and no shrinking (each step of it is a round trip to live servers: a
# failure is reported as found, and found again by the same seed).
FUZZ_SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                     phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, **FUZZ_SETTINGS)


class GoodTraffic:
    """Greedy streams, one after another in a thread, until stopped; each must arrive whole and the
    same as the first (the fuzzing beside it must neither break nor perturb them)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.streams: list[list[int]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)

    def __enter__(self) -> GoodTraffic:
        self._thread.start()
        wait_for(lambda: self.streams or self.error, 120, "the first good stream")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        try:
            with Client(self.endpoint) as client:
                while not self._stop.is_set():
                    events = list(client.stream(PROMPT, max_new_tokens=GOOD_TOKENS, ignore_eos=True, timeout=120))
                    assert [e.index for e in events] == list(range(GOOD_TOKENS)), "tokens lost or out of order"
                    assert events[-1].finish_reason == "length"
                    self.streams.append([e.token_id for e in events])
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def check(self) -> None:
        """Once stopped: every stream whole and identical, and more than the first, which ended
        before the fuzzing began."""
        assert self.error is None, repr(self.error)
        assert len(self.streams) >= 2, "no good stream ran beside the fuzzing"
        assert all(s == self.streams[0] for s in self.streams), "a good stream changed under the fuzzing"
