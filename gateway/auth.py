"""API keys (--api-key): when the gateway has one, every client must present it.

HTTP clients send `Authorization: Bearer KEY` (what TGI's and OpenAI's clients send); a
WebSocket client sends it on the upgrade (the header, or `?api_key=KEY` where a browser cannot
set headers) or in each generate message; a ZMQ client in each Generate. As in TGI, the
operational routes stay open (OPEN_PATHS). Keys are compared in constant time.
"""

from __future__ import annotations

import argparse
import hmac
import os
from dataclasses import dataclass, field

# Probes, scrapers and the API description work without the key; nothing in them is private.
OPEN_PATHS = frozenset({"/health", "/metrics", "/info", "/v1/models", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})

UNAUTHORIZED = "this server requires an API key; the one given is missing or wrong"


@dataclass(frozen=True)
class ApiKey:
    secret: bytes = field(repr=False)

    def admits(self, given: str | None) -> bool:
        # surrogatepass: a key decoded from hostile JSON may hold lone surrogates; it must not raise
        return given is not None and hmac.compare_digest(self.secret, given.encode("utf-8", "surrogatepass"))


def admits(key: ApiKey | None, given: str | None) -> bool:
    """Whether a client presenting `given` may proceed (anyone may when the gateway has no key)."""
    return key is None or key.admits(given)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def add_api_key_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--api-key", default=env("SPLITSERVE_API_KEY", ""),
                   help="require this key of every client (prefer $SPLITSERVE_API_KEY or --api-key-file: a "
                        "command line is visible to other users of the machine)")
    p.add_argument("--api-key-file", default=env("SPLITSERVE_API_KEY_FILE", ""),
                   help="read the key from this file (its first line)")


def api_key_option(ns: argparse.Namespace) -> ApiKey | None:
    if ns.api_key and ns.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    key = ns.api_key
    if ns.api_key_file:
        try:
            with open(ns.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ValueError(f"cannot read --api-key-file {ns.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {ns.api_key_file} is empty")
    if not key:
        return None
    if not all("!" <= c <= "~" for c in key):
        raise ValueError("the API key must be printable ASCII without spaces: it travels in an HTTP header")
    return ApiKey(key.encode())
