"""Synthetic prefill and decode workers for `splitserve bench gateway`: processes that speak the
real worker protocol (they register and heartbeat through the workers' own GatewayLink, answer
Prefill with a FirstToken to the request's frontend, hand the request to the decode worker with
KvReady and tell the router Prefilled at its KvRelease, send one StepTokens per step to each
frontend and a Finished per ended request to the router) but run no model and import no torch, so
that all the CPU a benchmark sees in the router and the frontends is their own.

Every token's text is the time it was sent, in microseconds since `--epoch-us` (the host clock,
`time.time_ns`), so that a client on the same host can tell how long the token took to reach it.

    python -m splitserve.bench.synthetic_workers --role decode --gateway tcp://127.0.0.1:5556 \\
        --fingerprint F --max-total-tokens 2048 --step-ms 5 --epoch-us E
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import zmq

from splitserve.common import protocol as P
from splitserve.common.frontend_links import FrontendLinks
from splitserve.common.request import GenerateRequest
from splitserve.common.worker_link import GatewayLink, pid_namespace
from splitserve.common.zmq_util import make_socket

log = logging.getLogger(__name__)

HEARTBEAT_S, HEARTBEAT_TIMEOUT_S = 0.5, 5.0
FIRST_TOKEN_ID = 32  # token ids cycle over a range every vocabulary has
TOKEN_IDS = 64


class Clock:
    """Send stamps: microseconds since the benchmark's epoch, as token text."""

    def __init__(self, epoch_us: int):
        self.epoch_us = epoch_us

    def stamp(self) -> str:
        return str(time.time_ns() // 1000 - self.epoch_us)


def token(index: int, text: str) -> P.Token:
    return P.Token(index, FIRST_TOKEN_ID + index % TOKEN_IDS, text)


def register(args: argparse.Namespace, worker_id: str, kv_endpoint: str = "") -> P.Register:
    capacity = args.slots if args.role == "decode" else args.max_total_tokens  # prefill: its token budget
    return P.Register(role=args.role, worker_id=worker_id, protocol=P.PROTOCOL_VERSION, host_id="synthetic",
                      gpu_uuids=[], device="cpu", kv_endpoint=kv_endpoint, kv_transports=["tcp"], capacity=capacity,
                      model_fingerprint=args.fingerprint, dtype="float32", slot_len=args.max_total_tokens,
                      pid=os.getpid(), pid_namespace=pid_namespace())


class Prefill:
    """Answers each Prefill at once: the first token (ending the request when it asked for one
    token), then KvReady to the decode worker named, with no KV behind it."""

    def __init__(self, args: argparse.Namespace, ctx: zmq.Context, worker_id: str):
        self.args, self.ctx, self.worker_id = args, ctx, worker_id
        self.clock = Clock(args.epoch_us)
        self.outputs = FrontendLinks(ctx)
        self.link: GatewayLink | None = None  # set once registered
        self.kv: dict[str, zmq.Socket] = {}  # decode endpoint -> the socket KvReady goes over
        self.release_decoder = P.decoder(P.KvRelease)

    def sockets(self) -> list[zmq.Socket]:
        return list(self.kv.values())

    def on_gateway(self, msg) -> None:
        if not isinstance(msg, P.Prefill):
            return  # a Cancel finds nothing queued: every prompt is answered as it arrives
        for request in (msg.request, *msg.forks):
            ends = request.max_new_tokens <= 1
            first = token(0, self.clock.stamp())
            self.outputs.send(request.reply_to, P.FirstToken(request.id, first, "length" if ends else None))
            if ends:
                self.link.send(P.Prefilled(request.id, "length"))
            else:  # Prefilled once the decode worker has it (on_socket)
                self._kv_socket(msg.decode_endpoint).send(P.encode(P.KvReady(
                    request, first.token_id, first.text, P.KvLocation(0, len(request.prompt_ids), "synthetic"),
                    msg.transport, self.worker_id, msg.deadline)))

    def _kv_socket(self, endpoint: str) -> zmq.Socket:
        sock = self.kv.get(endpoint)
        if sock is None:
            sock = self.kv[endpoint] = make_socket(self.ctx, zmq.DEALER, P.MAX_CONTROL_BYTES)
            sock.connect(endpoint)
        return sock

    def on_socket(self, sock: zmq.Socket) -> None:
        while sock.poll(0):
            release = P.decode(self.release_decoder, sock.recv_multipart()[0])  # there is no staging to free
            self.link.send(P.Prefilled(release.id))

    def load(self) -> int:
        return 0

    def due_in(self) -> float:
        return HEARTBEAT_S

    def step(self) -> None:
        pass

    def close(self) -> None:
        self.outputs.close()
        for sock in self.kv.values():
            sock.close(0)


class Decode:
    """Admits every KvReady into a slot at once and, every `--step-ms`, sends one StepTokens per
    frontend with a token for each active request; a request ends at its max_new_tokens with
    finish reason "length", or with Finished "cancelled" at the next step after a Cancel."""

    def __init__(self, args: argparse.Namespace, ctx: zmq.Context, worker_id: str):
        self.args, self.ctx = args, ctx
        self.clock = Clock(args.epoch_us)
        self.outputs = FrontendLinks(ctx)
        self.link: GatewayLink | None = None  # set once registered
        self.kv_sock = make_socket(ctx, zmq.ROUTER, P.MAX_CONTROL_BYTES)
        self.kv_sock.bind("tcp://127.0.0.1:*")
        self.kv_endpoint = self.kv_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.kv_decoder = P.decoder(P.KvToDecode)
        self.active: dict[str, tuple[GenerateRequest, int]] = {}  # id -> (request, next output index)
        self.cancelled: list[str] = []  # ids whose Finished goes at the next step
        self.tombstones: set[str] = set()  # cancelled while not active here: their KvReady is refused
        self.period = args.step_ms / 1e3
        self.next_step = time.monotonic()

    def sockets(self) -> list[zmq.Socket]:
        return [self.kv_sock]

    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.Cancel):
            if self.active.pop(msg.id, None) is None:
                self.tombstones.add(msg.id)
            self.cancelled.append(msg.id)  # ended either way, as the decode worker does

    def on_socket(self, sock: zmq.Socket) -> None:
        while sock.poll(0):
            peer, frame = sock.recv_multipart()[:2]
            msg = P.decode(self.kv_decoder, frame)
            if not isinstance(msg, P.KvReady):
                continue
            sock.send_multipart([peer, P.encode(P.KvRelease(msg.request.id, msg.location.offset))])
            if msg.request.id in self.tombstones:
                self.tombstones.discard(msg.request.id)
            else:
                self.active[msg.request.id] = (msg.request, 1)

    def load(self) -> int:
        return len(self.active)

    def due_in(self) -> float:
        return max(0.0, self.next_step - time.monotonic()) if self.active or self.cancelled else HEARTBEAT_S

    def step(self) -> None:
        """One step's tokens, when one is due; a step that comes late is not made up for."""
        now = time.monotonic()
        if now < self.next_step or not (self.active or self.cancelled):
            return
        self.next_step = max(self.next_step + self.period, now)
        text = self.clock.stamp()
        steps: dict[str, list[P.StepEntry]] = {}
        ended = []
        for rid, (request, index) in list(self.active.items()):
            last = index + 1 >= request.max_new_tokens
            entry = P.StepEntry(rid, token(index, text), "length" if last else None)
            steps.setdefault(request.reply_to, []).append(entry)
            if last:
                del self.active[rid]
                ended.append(rid)
            else:
                self.active[rid] = (request, index + 1)
        for destination, entries in steps.items():
            self.outputs.send(destination, P.StepTokens(entries))
        for rid in ended:
            self.link.send(P.Finished(rid, "length"))
        for rid in self.cancelled:
            self.link.send(P.Finished(rid, "cancelled"))
        self.cancelled.clear()

    def close(self) -> None:
        self.outputs.close()
        self.kv_sock.close(0)


def serve(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    worker_id = f"synthetic-{args.role}-{os.getpid()}"
    worker = (Decode if args.role == "decode" else Prefill)(args, ctx, worker_id)
    link = worker.link = GatewayLink(ctx, args.gateway, register(args, worker_id, getattr(worker, "kv_endpoint", "")),
                                     list, HEARTBEAT_S, HEARTBEAT_TIMEOUT_S)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        while not stop and not link.refused:
            poller = zmq.Poller()
            for sock in (link.sock, *worker.sockets()):
                poller.register(sock, zmq.POLLIN)
            for sock, _ in poller.poll(1e3 * min(worker.due_in(), HEARTBEAT_S)):
                if sock is link.sock:
                    for msg in link.receive():
                        if isinstance(msg, P.Drain):
                            stop.append(True)
                        else:
                            worker.on_gateway(msg)
                else:
                    worker.on_socket(sock)
            worker.step()
            link.tick(worker.load(), False)
        return 1 if link.refused else 0
    finally:
        worker.close()
        link.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitserve.bench.synthetic_workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--gateway", required=True, help="the gateway's worker endpoint")
    p.add_argument("--fingerprint", required=True, help="the gateway's model fingerprint")
    p.add_argument("--max-total-tokens", type=int, required=True, help="the gateway's max_total_tokens")
    p.add_argument("--step-ms", type=float, default=5.0, help="decode: time between steps")
    p.add_argument("--slots", type=int, default=1024, help="decode: requests at once")
    p.add_argument("--epoch-us", type=int, default=0, help="token stamps count microseconds from here")
    logging.basicConfig(level=logging.WARNING)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
