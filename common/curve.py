"""CURVE (ZeroMQ's encryption and authentication) for the worker link when it crosses hosts.

The gateway's worker port is the CURVE server; workers are clients that must know the gateway's
public key (so a worker never talks to an impostor) and, when the gateway names the keys it lets
in, must hold one of them (so nothing else registers as a worker). Keys live in ZeroMQ
certificate files, the format `zmq.auth.load_certificate` reads: NAME.key (public, to hand out)
and NAME.key_secret (public + secret, mode 0600); `splitserve keygen` writes a pair.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

Z85_KEY_LEN = 40


@dataclass(frozen=True)
class CurveKeys:
    """This process's key pair and whom it trusts.

    A client has `server` (the gateway's public key); the server has `server` None and, in
    `clients`, the public keys it lets in (None: any client that completes the handshake, i.e.
    that knows the server's public key)."""

    public: bytes  # Z85
    secret: bytes = field(repr=False)  # Z85
    server: bytes | None = None
    clients: frozenset[bytes] | None = None


def require_curve() -> None:
    if not zmq.has("curve"):
        raise ValueError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE security; install a pyzmq "
                         "wheel (they bundle libzmq with libsodium) or a libzmq built with it")


def load_keypair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret certificate."""
    public, secret = _load(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key: give the .key_secret file of a pair from `splitserve keygen`")
    return public, secret


def load_public_key(spec: str) -> bytes:
    """A public key given as its 40 Z85 characters or as a certificate file holding it."""
    if len(spec) == Z85_KEY_LEN and not os.path.exists(spec):
        try:
            z85.decode(spec)
        except ValueError:
            raise ValueError(f"{spec!r} is neither a certificate file nor a Z85 public key") from None
        return spec.encode()
    return _load(spec)[0]


def load_public_keys(directory: str | os.PathLike) -> frozenset[bytes]:
    """Every public key in the *.key certificates of a directory."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory of public key certificates (*.key)")
    keys = frozenset(_load(path)[0] for path in sorted(Path(directory).glob("*.key")))
    if not keys:
        raise ValueError(f"{directory} holds no public key certificate (*.key)")
    return keys


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the CURVE certificate {path}: {e}") from None


def write_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A new key pair as DIRECTORY/NAME.key and DIRECTORY/NAME.key_secret; never overwrites."""
    require_curve()
    public, secret = zmq.curve_keypair()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in paths:
        if path.exists():
            raise ValueError(f"{path} exists; remove it or pick another --name")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write(paths[0], f"#   ZeroMQ CURVE public certificate, written {stamp} by splitserve keygen\n", public, None, 0o644)
    _write(paths[1], f"#   ZeroMQ CURVE **secret** certificate, written {stamp} by splitserve keygen\n"
                     "#   Keep it private.\n", public, secret, 0o600)
    return paths


def _write(path: Path, banner: str, public: bytes, secret: bytes | None, mode: int) -> None:
    lines = [banner, "metadata\n", "curve\n", f'    public-key = "{public.decode()}"\n']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"\n')
    # created with its final mode: a secret is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)


def secure(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make `sock` a CURVE client (keys.server set) or server; before it binds or connects."""
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    if keys.server is not None:
        sock.curve_serverkey = keys.server
    else:
        sock.curve_server = True


class _AllowList:
    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def guard_clients(ctx: zmq.Context, keys: CurveKeys) -> AsyncioAuthenticator | None:
    """Start the ZAP handler that lets in only `keys.clients` (and the server's own key, which
    `splitserve serve` gives its local workers) on every CURVE server socket of `ctx`. Call on
    the running asyncio loop, before the socket binds; None when any client may connect."""
    if keys.clients is None:
        return None
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", _AllowList(keys.clients | {keys.public}))
    return auth
