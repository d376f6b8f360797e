"""The decode worker's output: it turns each step's token ids into text (incremental
detokenization, stop strings) and sends one message per step to each frontend that owns some of
the step's requests. A stop-string match is handed back to the decode loop, which frees the slot.

On CUDA a thread does this, overlapping the next step: the loop spends its step in the host sync
with the GIL released. On a CPU the loop does it itself (`inline`), right after the step. There
the step is Python and PyTorch calls that hold the GIL all but a few microseconds at a time, and
a waiting thread takes the GIL only by winning a race against those short releases (CPython's
forced switch never comes: each re-acquisition counts as a switch). The thread lost that race for
a step or more, then sent the steps it had fallen behind on back to back, so tokens left in bursts;
while it did win, the two threads took turns on the GIL and a step after an admission (its
text stream's replay) ran ~2x slower. Inline, the same work costs the loop no more than the GIL
it would have lost, and each step's tokens leave as it ends."""

from __future__ import annotations

import logging
import queue
import threading

import zmq

from splitserve.common import protocol as P
from splitserve.common.params import Finish
from splitserve.common.request import GenerateRequest
from splitserve.common.text_stream import TextStream
from splitserve.common.tokenizer import Tokenizer
from splitserve.common.curve import CurveKeys
from splitserve.common.frontend_links import FrontendLinks

from .engine import StepOutput

log = logging.getLogger(__name__)


class Output:
    """Fed in order by the decode loop: `admit` each request, then `step` after each step;
    releases come back on `released`. `inline`: the caller's thread does each item at once (see
    the module's doc), else a thread of its own takes them from a queue, in the same order."""

    def __init__(self, ctx: zmq.Context, tokenizer: Tokenizer, curve: CurveKeys | None = None, inline: bool = False):
        self.tokenizer = tokenizer
        # (slot, request id, finish reason) to free
        self.released: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, TextStream] = {}
        if inline:
            links = FrontendLinks(ctx, curve)
            self._do = lambda item: self._handle(links, item)
            self._stop = links.close
        else:
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(inbox, ctx, curve), name="decode-output", daemon=True)
            thread.start()
            self._do = inbox.put

            def stop() -> None:
                inbox.put(None)
                thread.join(timeout=10)

            self._stop = stop

    def admit(self, slot: int, request: GenerateRequest, first_token: int, first_text: str) -> None:
        self._do(("admit", slot, request, first_token, first_text))

    def step(self, out: StepOutput) -> None:
        self._do(("step", out))

    def stop(self) -> None:
        self._stop()

    def _run(self, inbox: queue.SimpleQueue, ctx: zmq.Context, curve: CurveKeys | None) -> None:
        # Sockets of its own, since ZMQ sockets belong to one thread.
        links = FrontendLinks(ctx, curve)
        try:
            while (item := inbox.get()) is not None:
                self._handle(links, item)
        except Exception:
            log.exception("the output thread failed")
            raise
        finally:
            links.close()

    def _handle(self, links: FrontendLinks, item: tuple) -> None:
        if item[0] == "admit":
            self._admit(*item[1:])
        else:
            self._send(links, item[1])

    def _send(self, links: FrontendLinks, out: StepOutput) -> None:
        for endpoint, entries in self._entries(out).items():
            links.send(endpoint, P.StepTokens(entries))

    def _admit(self, slot: int, request: GenerateRequest, first_token: int, first_text: str) -> None:
        stream = TextStream(self.tokenizer, request)
        replayed = stream.event(first_token, Finish.NONE)  # the prefill worker already sent it
        if replayed.text != first_text:
            log.warning("first-token text of %s differs between prefill and decode", request.id)
        self.streams[slot] = stream

    def _entries(self, out: StepOutput) -> dict[str, list[P.StepEntry]]:
        """The step's tokens by the frontend endpoint they go to."""
        entries: dict[str, list[P.StepEntry]] = {}
        for i, slot in enumerate(out.slots):
            stream = self.streams.get(slot)
            if stream is None or stream.done:  # stopped by a stop string, slot not yet freed
                continue
            request = stream.request
            logprob = top = None
            if out.logprobs is not None and request.wants_details:
                logprob = out.logprobs[i]
                n = request.top_n_tokens
                if n:
                    top = list(zip(out.top_ids[i][:n], out.top_logprobs[i][:n]))
            ev = stream.event(out.tokens[i], out.finish[i], logprob, top)
            token = P.Token(ev.index, ev.token_id, ev.text, ev.logprob, top)
            entry = P.StepEntry(request.id, token, ev.finish.reason)
            if request.reply_to in entries:
                entries[request.reply_to].append(entry)
            else:
                entries[request.reply_to] = [entry]
            if ev.finish != Finish.NONE and out.finish[i] == Finish.NONE:
                self.released.put((slot, request.id, ev.finish.reason))
        return entries
