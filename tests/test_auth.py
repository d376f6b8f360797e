"""--api-key on a live gateway: every front end (HTTP TGI and OpenAI, WebSocket, ZMQ) refuses a
client without the key with its own typed error, serves one with it, and leaves the operational
routes open."""

from __future__ import annotations

import argparse
from urllib.parse import urlencode

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from cluster import Cluster
from splitserve.client import Client, UnauthorizedError, WebSocketClient
from splitserve.gateway.auth import ApiKey, add_api_key_args, api_key_option, bearer

KEY = "sk-test/+=key"
PROMPT = "def fibonacci(n):\n    "
SHORT = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}


@pytest.fixture(scope="module")
def cluster(home, tiny_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("auth") / "api-key"
    key_file.write_text(KEY + "\n")
    with Cluster(home, api_key_file=str(key_file)) as c:
        c.start_pipeline(8)
        yield c


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_http_needs_the_key_on_the_apis_only(cluster):
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        for headers in ({}, auth("wrong"), {"Authorization": KEY}, {"Authorization": "Basic abc"}):
            r = http.post("/generate", json=SHORT, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"error": "this server requires an API key; the one given is missing or wrong",
                                "error_type": "unauthorized"}
        # refused before the body is read: a malformed body without the key is still a 401
        assert http.post("/generate_stream", content=b"{not json", headers={"Content-Type": "application/json"}
                         ).status_code == 401
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "unauthorized"
        for path in ("/health", "/metrics", "/info", "/v1/models", "/openapi.json"):
            assert http.get(path).status_code == 200, path

        r = http.post("/generate", json=SHORT, headers=auth(KEY))
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 3
        with http.stream("POST", "/generate_stream", json=SHORT, headers=auth(KEY)) as r:
            assert r.status_code == 200 and len([line for line in r.iter_lines() if line.startswith("data:")]) == 3
    assert cluster.metric("splitserve_requests_total", route="/generate", outcome="unauthorized") == 4


def test_openai_client_sends_the_key(cluster):
    good = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0)
    done = good.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3)


def test_zmq_needs_the_key(cluster):
    with Client(cluster.endpoint) as anonymous, pytest.raises(UnauthorizedError):
        anonymous.generate(PROMPT, max_new_tokens=3)
    with Client(cluster.endpoint, api_key="wrong") as wrong, pytest.raises(UnauthorizedError):
        wrong.generate(PROMPT, max_new_tokens=3)
    with Client(cluster.endpoint, api_key=KEY) as client:
        assert len(client.generate(PROMPT, max_new_tokens=3).token_ids) == 3
    assert cluster.metric("splitserve_requests_total", route="zmq", outcome="unauthorized") == 2


def test_websocket_key_on_the_upgrade_or_in_each_message(cluster):
    url = cluster.url.replace("http://", "ws://") + "/ws"
    with WebSocketClient(url) as anonymous, pytest.raises(UnauthorizedError):
        anonymous.generate(PROMPT, max_new_tokens=3)
    with WebSocketClient(url, api_key=KEY, encoding="json") as client:  # in each message
        assert len(client.generate(PROMPT, max_new_tokens=3).token_ids) == 3
    generate = '{"type": "generate", "id": "a", "prompt": "x = 1", "parameters": {"max_new_tokens": 2}}'
    for uri, headers in ((url, auth(KEY)), (f"{url}?{urlencode({'api_key': KEY})}", {})):
        with connect(uri, additional_headers=headers) as ws:  # the key on the upgrade, none in the messages
            ws.send(generate)
            replies = [ws.recv(timeout=60)]
            while '"finish_reason":null' in replies[-1]:
                replies.append(ws.recv(timeout=60))
            assert '"type":"tokens"' in replies[-1] and '"finish_reason":"length"' in replies[-1]
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=auth("wrong"))
    assert refused.value.response.status_code == 403


def test_key_options():
    def parse(*argv: str) -> ApiKey | None:
        p = argparse.ArgumentParser()
        add_api_key_args(p)
        return api_key_option(p.parse_args(argv))

    assert parse("--api-key", "k").admits("k") and not parse("--api-key", "k").admits("K")
    assert "k" not in repr(parse("--api-key", "k"))
    with pytest.raises(ValueError, match="not both"):
        parse("--api-key", "k", "--api-key-file", "f")
    with pytest.raises(ValueError, match="printable ASCII"):
        parse("--api-key", "k é")
    with pytest.raises(ValueError, match="cannot read"):
        parse("--api-key-file", "/nonexistent/key")
    assert not ApiKey(b"k").admits(None) and not ApiKey(b"k").admits("\ud800")
    assert bearer("bearer  tok ") == "tok" and bearer("Bearer") is None and bearer(None) is None
