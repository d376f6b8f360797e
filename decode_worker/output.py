"""The decode worker's output thread: overlapping the next step (on CUDA), it turns each step's
token ids into text (incremental detokenization, stop strings) and sends one message per step to
the gateway. A stop-string match is handed back to the decode loop, which frees the slot.

On a CPU the decode loop waits for each step's message to be sent before it starts the next step
(`wait`). Its step is Python and PyTorch calls that hold the GIL all but a few microseconds at a
time, so a thread that wants the GIL gets it only by winning a race against those short releases:
the output thread lost it for one step or more, then sent the steps it had fallen behind on back
to back, and a stream's tokens reached the gateway in pairs. The thread's work is Python too, so
waiting for it costs the loop no more than losing the GIL to it would. On CUDA the loop spends its
step in the host sync with the GIL released, and the thread works meanwhile: no wait there."""

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
from splitserve.common.zmq_util import make_socket

from .engine import StepOutput

log = logging.getLogger(__name__)


class OutputThread:
    """Fed in order by the decode loop: ("admit", slot, request, first_token, first_text),
    ("step", StepOutput) and ("stop", None); releases come back on `released`. With `wait`,
    `step()` returns once that step's message is sent (see the module's doc)."""

    def __init__(self, ctx: zmq.Context, gateway: str, tokenizer: Tokenizer, worker_id: str,
                 curve: CurveKeys | None = None, wait: bool = False):
        self.ctx, self.gateway, self.tokenizer, self.curve = ctx, gateway, tokenizer, curve
        self.identity = worker_id.encode() + P.OUTPUT_SUFFIX
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.released: queue.SimpleQueue = queue.SimpleQueue()  # (slot, request id) to free
        self.streams: dict[int, TextStream] = {}
        self.wait = wait
        self.sent = threading.Semaphore(0)  # one release per step handled, when waited for
        self.thread = threading.Thread(target=self._run, name="decode-output", daemon=True)
        self.thread.start()

    def admit(self, slot: int, request: GenerateRequest, first_token: int, first_text: str) -> None:
        self.inbox.put(("admit", slot, request, first_token, first_text))

    def step(self, out: StepOutput) -> None:
        self.inbox.put(("step", out))
        if not self.wait:
            return
        # A thread that failed has logged why; the steps go on unsent, as they do without `wait`.
        while self.thread.is_alive() and not self.sent.acquire(timeout=1.0):
            pass

    def stop(self) -> None:
        self.inbox.put(("stop",))
        self.thread.join(timeout=10)

    def _run(self) -> None:
        # Its own socket, since ZMQ sockets belong to one thread; its name tells the gateway whose.
        sock = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES, identity=self.identity, curve=self.curve)
        sock.connect(self.gateway)
        try:
            while True:
                item = self.inbox.get()
                if item[0] == "stop":
                    return
                if item[0] == "admit":
                    self._admit(*item[1:])
                else:
                    entries = self._entries(item[1])
                    if entries:
                        sock.send(P.encode(P.StepTokens(entries)))
                    if self.wait:
                        self.sent.release()
        except Exception:
            log.exception("the output thread failed")
            raise
        finally:
            sock.close(0)

    def _admit(self, slot: int, request: GenerateRequest, first_token: int, first_text: str) -> None:
        stream = TextStream(self.tokenizer, request)
        replayed = stream.event(first_token, Finish.NONE)  # the prefill worker already sent it
        if replayed.text != first_text:
            log.warning("first-token text of %s differs between prefill and decode", request.id)
        self.streams[slot] = stream

    def _entries(self, out: StepOutput) -> list[P.StepEntry]:
        entries = []
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
            entries.append(P.StepEntry(request.id, token, ev.finish.reason))
            if ev.finish != Finish.NONE and out.finish[i] == Finish.NONE:
                self.released.put((slot, request.id))
        return entries
