"""The decode worker's output, inline (the CPU's way) and on its own thread (CUDA's): the same
messages to each frontend, in step order, and the same stop-string releases."""

from __future__ import annotations

import pytest
import zmq

from splitserve.common import protocol as P
from splitserve.common.params import Finish
from splitserve.common.request import GenerateRequest
from splitserve.common.tokenizer import Tokenizer
from splitserve.common.zmq_util import free_port
from splitserve.decode_worker.engine import StepOutput
from splitserve.decode_worker.output import Output

from conftest import prompt

TOKENS = [prompt(12, seed) for seed in (1, 2)]  # what two requests decode, one token per step


def run_output(tokenizer: Tokenizer, inline: bool, stop: str) -> tuple[list[P.StepTokens], list, list]:
    """Two requests on two frontends, the first with a stop string; -> what each frontend got
    (in order) and the releases."""
    ctx = zmq.Context()
    pulls, endpoints = [], []
    for _ in range(2):
        endpoints.append(f"tcp://127.0.0.1:{free_port()}")
        pulls.append(ctx.socket(zmq.PULL))
        pulls[-1].bind(endpoints[-1])
    out = Output(ctx, tokenizer, inline=inline)
    try:
        requests = [GenerateRequest("a", prompt(8, 0), 20, stop=(stop,), reply_to=endpoints[0]),
                    GenerateRequest("b", prompt(8, 1), 20, reply_to=endpoints[1])]
        for slot, request in enumerate(requests):
            out.admit(slot, request, 5, tokenizer.decode([5]))
        steps = len(TOKENS[0])
        for i in range(steps):
            last = i == steps - 1
            out.step(StepOutput([0, 1], ["a", "b"], [TOKENS[0][i], TOKENS[1][i]], [Finish.NONE, Finish.LENGTH * last]))
        got = [[], []]
        for pull, frontend in zip(pulls, got):
            while not frontend or not any(e.finish_reason for e in frontend[-1].entries):
                assert pull.poll(10_000), "a frontend got no end"
                frontend.append(P.decode(P.decoder(P.StepTokens), pull.recv()))
        released = []
        while not out.released.empty():
            released.append(out.released.get())
        return got, released
    finally:
        out.stop()
        for pull in pulls:
            pull.close(0)
        ctx.term()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def test_inline_and_threaded_send_the_same(tokenizer):
    text = tokenizer.decode(list(TOKENS[0]))
    stop = text[len(text) // 2:][:3]  # a stop string partway through the first request's text
    inline, inline_released = run_output(tokenizer, True, stop)
    threaded, threaded_released = run_output(tokenizer, False, stop)
    assert inline == threaded and inline_released == threaded_released
    a, b = inline
    assert all(len(m.entries) == 1 for m in a + b)  # one message per step per frontend
    assert [m.entries[0].token.index for m in b] == list(range(1, len(TOKENS[1]) + 1))
    assert b[-1].entries[0].finish_reason == "length"
    assert a[-1].entries[0].finish_reason == "stop_sequence" and len(a) < len(TOKENS[0])
    assert inline_released == [(0, "a", "stop_sequence")]
    assert stop in "".join(m.entries[0].token.text for m in a)
