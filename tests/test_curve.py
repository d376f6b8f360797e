"""CURVE on the worker link: a gateway with a key pair answers only workers that know its public
key and hold a key it lets in; everything else never gets a word from it, while its client
front keeps serving in the clear. The KV link between the workers is then encrypted too."""

from __future__ import annotations

import argparse
import itertools
import os
import stat
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from cluster import Cluster, SplitCluster, wait_for
from splitserve.client import Client, UnavailableError
from splitserve.common import protocol as P
from splitserve.common.curve import load_keypair, write_keypair
from splitserve.common.service_config import add_link_args, link_options
from splitserve.common.worker_link import GatewayLink
from splitserve.commands.serve import curve_worker_flags
from splitserve.common.service_config import worker_argv

SILENCE_S = 3.0  # how long a link that should get no answer is watched, after a good one got its answer


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("curve")
    out = {}
    for name, folder in (("gateway", "gateway"), ("workers", "clients"), ("stranger", "stranger"),
                         ("impostor", "impostor")):
        public, secret = write_keypair(root / folder, name)
        out[name], out[f"{name}.pub"], out[f"{name}.dir"] = str(secret), str(public), str(root / folder)
    return out


def register(worker_id: str) -> P.Register:
    # a fingerprint no gateway expects: the answer is a refusal, which still proves the link carries words
    return P.Register("prefill", worker_id, P.PROTOCOL_VERSION, "host", [], "cpu", "", ["shm"], 64, "not-a-model",
                      "float32", 64, os.getpid(), "pid:0")


def worker_keys(secret: str, server_key: str):
    p = argparse.ArgumentParser()
    add_link_args(p, server=False)
    return link_options(p.parse_args(["--curve-secret-file", secret, f"--curve-server-key={server_key}"])).curve


def heard(link: GatewayLink) -> bool:
    link.receive()
    return link.registered or bool(link.refused)


def test_only_workers_with_the_right_keys_are_answered(home, tiny_dir, keys):
    ctx = zmq.Context()
    with Cluster(home, curve_secret_file=keys["gateway"], curve_clients=keys["workers.dir"]) as c:
        endpoint = f"tcp://127.0.0.1:{c.worker_port}"
        good = GatewayLink(ctx, endpoint, register("good"), list, 0.5, 60,
                           curve=worker_keys(keys["workers"], keys["gateway.pub"]))
        others = {
            "wrong server key": GatewayLink(ctx, endpoint, register("a"), list, 0.5, 60,
                                            curve=worker_keys(keys["workers"], keys["impostor.pub"])),
            "key not let in": GatewayLink(ctx, endpoint, register("b"), list, 0.5, 60,
                                          curve=worker_keys(keys["stranger"], keys["gateway.pub"])),
            "no CURVE": GatewayLink(ctx, endpoint, register("c"), list, 0.5, 60),
        }
        try:
            wait_for(lambda: heard(good), 60, "the gateway to answer the worker with the right keys")
            assert "fingerprint" in good.refused  # the gateway read the Register and answered it
            deadline = time.monotonic() + SILENCE_S
            while time.monotonic() < deadline:
                assert not [name for name, link in others.items() if heard(link)]
                time.sleep(0.05)
            # the client front has no CURVE and is not subject to the worker allow-list
            with Client(c.endpoint) as client, pytest.raises(UnavailableError, match="no prefill worker"):
                client.generate("x", max_new_tokens=1, timeout=30)
        finally:
            for link in (good, *others.values()):
                link.close()
            ctx.term()


def test_workers_with_curve_keys_serve_and_a_worker_with_the_wrong_key_never_registers(home, tiny_dir, keys):
    with Cluster(home, curve_secret_file=keys["gateway"], curve_clients=keys["workers.dir"]) as c:
        # KV as frames over the decode worker's socket, as between hosts: with CURVE it is encrypted too
        wids = [c.add_worker(role, "--curve-secret-file", keys["workers"], "--curve-server-key", keys["gateway.pub"],
                             "--kv-transport", "tcp") for role in ("prefill", "decode")]
        fooled = c.add_worker("prefill", "--curve-secret-file", keys["workers"], "--curve-server-key",
                              keys["impostor.pub"])
        c.wait_registered(*wids)
        with Client(c.endpoint) as client:
            assert len(client.generate("def f(x):", max_new_tokens=4, ignore_eos=True).token_ids) == 4
        assert not (c.health(fooled) or {}).get("registered")

        decode = c.health(wids[1])
        assert decode["kv_encrypted"]
        assert handshake(decode["kv_endpoint"]) == "refused"  # nothing in the clear reaches the KV port
        assert handshake(c.endpoint) == "done"  # while the client front is plain, as it should be


def test_a_router_and_a_frontend_of_their_own_under_curve(home, tiny_dir, keys):
    """The frontend joins the router with the router's own key pair, serves its token port with it,
    and workers holding a key the router lets in send it tokens."""
    curve = ("--curve-secret-file", keys["gateway"], "--curve-clients", keys["workers.dir"])
    with SplitCluster(home, 1, "tiny-random", 2.0, *curve) as c:
        for role in ("prefill", "decode"):
            c.add_worker(role, "--curve-secret-file", keys["workers"], "--curve-server-key", keys["gateway.pub"],
                         "--kv-transport", "tcp")
        c.wait_ready()
        with Client(c.endpoints) as client:
            assert len(client.generate("def f(x):", max_new_tokens=4, ignore_eos=True).token_ids) == 4
        assert handshake(f"tcp://127.0.0.1:{c.frontend_port}") == "refused"  # the router's frontend port


def handshake(endpoint: str) -> str:
    """How a plain (unencrypted) ZMQ peer's handshake with `endpoint` ends."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        sock.connect(endpoint)
        assert monitor.poll(10_000), f"no handshake with {endpoint}"
        event = recv_monitor_message(monitor)["event"]
        return "done" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()


def test_serve_gives_its_workers_a_public_key_that_begins_like_a_flag(tmp_path):
    for i in itertools.count():  # Z85 text begins with '-' about once in 85 keys
        public, secret = write_keypair(tmp_path, f"pair{i}")
        if load_keypair(secret)[0].startswith(b"-"):
            break
    argv = worker_argv("decode", curve_worker_flags(str(secret)))
    assert link_options(_parse(argv, server=False)).curve.server == load_keypair(secret)[0]


def test_keys_and_options(tmp_path, keys):
    public, secret = write_keypair(tmp_path, "pair")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert load_keypair(secret)[0] == worker_keys(str(secret), str(public)).server
    z85 = load_keypair(keys["gateway"])[0].decode()
    assert worker_keys(str(secret), z85).server == z85.encode()  # the server key as text, as serve passes it
    with pytest.raises(ValueError, match="exists"):
        write_keypair(tmp_path, "pair")
    with pytest.raises(ValueError, match="no secret key"):
        worker_keys(str(public), z85)
    with pytest.raises(ValueError, match="--curve-server-key"):
        link_options(_parse(["--curve-secret-file", str(secret)], server=False))
    with pytest.raises(ValueError, match="needs --curve-secret-file"):
        link_options(_parse(["--curve-clients", str(tmp_path)], server=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no public key certificate"):
        link_options(_parse(["--curve-secret-file", str(secret), "--curve-clients", str(tmp_path / "empty")],
                            server=True))
    assert link_options(_parse([], server=True)).curve is None
    assert "secret=" not in repr(worker_keys(str(secret), z85))


def _parse(argv: list[str], server: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_link_args(p, server=server)
    return p.parse_args(argv)
