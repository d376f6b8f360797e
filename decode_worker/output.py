"""The decode worker's output thread: overlapping the next step, it turns each step's token ids
into text (incremental detokenization, stop strings) and sends one message per step to each
frontend that owns some of the step's requests. A stop-string match is handed back to the decode
loop, which frees the slot."""

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


class OutputThread:
    """Fed in order by the decode loop: ("admit", slot, request, first_token, first_text),
    ("step", StepOutput) and ("stop", None); releases come back on `released`."""

    def __init__(self, ctx: zmq.Context, tokenizer: Tokenizer, curve: CurveKeys | None = None):
        self.ctx, self.tokenizer, self.curve = ctx, tokenizer, curve
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        # (slot, request id, finish reason) to free
        self.released: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, TextStream] = {}
        self.thread = threading.Thread(target=self._run, name="decode-output", daemon=True)
        self.thread.start()

    def admit(self, slot: int, request: GenerateRequest, first_token: int, first_text: str) -> None:
        self.inbox.put(("admit", slot, request, first_token, first_text))

    def step(self, out: StepOutput) -> None:
        self.inbox.put(("step", out))

    def stop(self) -> None:
        self.inbox.put(("stop",))
        self.thread.join(timeout=10)

    def _run(self) -> None:
        # Sockets of its own, since ZMQ sockets belong to one thread.
        links = FrontendLinks(self.ctx, self.curve)
        try:
            while True:
                item = self.inbox.get()
                if item[0] == "stop":
                    return
                if item[0] == "admit":
                    self._admit(*item[1:])
                else:
                    for endpoint, entries in self._entries(item[1]).items():
                        links.send(endpoint, P.StepTokens(entries))
        except Exception:
            log.exception("the output thread failed")
            raise
        finally:
            links.close()

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
