"""Stop strings over streamed text: hold back what could still become a match."""

from __future__ import annotations


class StopStringMatcher:
    """Feed text deltas of one sequence; get back text that is safe to emit and whether a stop
    string matched. Text that ends with a prefix of some stop string is held back until the
    next delta settles it, so a client never receives part of a stop string it won't see whole.
    """

    def __init__(self, stops: tuple[str, ...] | list[str], strip: bool):
        self.stops = tuple(s for s in stops if s)
        self.strip = strip
        self.held = ""
        self.longest = max((len(s) for s in self.stops), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text to emit, matched)."""
        if not self.stops:
            return delta, False
        text = self.held + delta
        hit = self._first_match(text)
        if hit is not None:
            start, stop = hit
            self.held = ""
            return text[: start if self.strip else start + len(stop)], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
