"""KV transports: a real decode process copies out of a real prefill staging buffer, with the
description and locations sent as MessagePack over ZMQ (never pickle)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import msgspec
import pytest
import torch
import zmq

from pair_child import pair_child
from splitserve.common.kv_transport import (
    KvImporter,
    allocate_staging,
    gpu_uuids,
    owner_gone,
    sweep_orphan_staging,
)
from splitserve.common.protocol import KvLocation

torch.set_num_threads(1)

BUDGET = 16
SHAPE = (3, 2, BUDGET, 1, 8)  # [n_layer, 2, budget, KVH, D]
REGIONS = [(0, 5), (5, 3), (BUDGET - 4, 4), (0, BUDGET)]  # the last is contiguous in staging

# The decode side, in a process of its own: open the description (twice: the second must hit the
# cache), then copy each region it is told about into its own tensor and send back the bytes.
DECODE_CHILD = r"""
import sys
import msgspec, torch, zmq
from splitserve.common.kv_transport import KvImporter
from splitserve.common.protocol import MAX_KV_BYTES, KvLocation

torch.set_num_threads(1)
port, device = int(sys.argv[1]), sys.argv[2]
sock = zmq.Context().socket(zmq.PAIR)
sock.setsockopt(zmq.MAXMSGSIZE, MAX_KV_BYTES)
sock.setsockopt(zmq.RCVTIMEO, 20000)
sock.connect(f"tcp://127.0.0.1:{port}")
desc = msgspec.msgpack.decode(sock.recv())
importer = KvImporter(device, getattr(torch, desc["dtype"]))
importer.open(desc)
# A view held across the second open would keep a second mapping alive, were one made.
held = importer.view("shm", desc["key"], 0, 1) if desc["transport"] == "shm" else None
importer.open(msgspec.msgpack.decode(msgspec.msgpack.encode(desc)))
with open("/proc/self/maps") as f:
    maps = f.read().count(desc["key"]) if desc["transport"] == "shm" else -1
sock.send(msgspec.msgpack.encode(maps))
while True:
    header, *frames = sock.recv_multipart(copy=False)
    if not header.bytes:
        break
    transport, loc = msgspec.msgpack.decode(header.bytes, type=tuple[str, KvLocation])
    mine = importer.view(transport, loc.staging, loc.offset, loc.length, frames).clone()
    sock.send(mine.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
importer.close()
sock.close(linger=1000)
"""


class DecodeChild:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock

    def open(self, desc: dict) -> int:
        """-> how many times the child has the shm file mapped (-1 for other transports)."""
        self.sock.send(msgspec.msgpack.encode(desc))
        return msgspec.msgpack.decode(self.sock.recv())

    def copy(self, transport: str, loc: KvLocation, frames: list = ()) -> bytes:
        self.sock.send_multipart([msgspec.msgpack.encode((transport, loc)), *frames], copy=False)
        return self.sock.recv()


@contextmanager
def decode_child(device: str = "cpu"):
    with pair_child(DECODE_CHILD, device) as sock:
        yield DecodeChild(sock)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def fill(staging, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    staging.tensor.copy_(torch.randn(SHAPE, generator=gen).to(staging.tensor.dtype))


def roundtrip(desc: dict) -> dict:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(desc))


# ---- across processes ---------------------------------------------------------------------


def test_shm_handoff_between_processes():
    staging = allocate_staging(SHAPE, torch.bfloat16, "cpu", "shm", "prefill/0")
    try:
        assert os.path.exists(staging.key) and f"prefill_0-{os.getpid()}-" in staging.key
        with decode_child() as child:
            assert child.open(staging.export()) == 1  # mapped once, though opened twice
            fill(staging, 0)  # written after the child mapped it: the mapping is live, not a snapshot
            assert staging.frames(0, 1)  # any staging can also feed a tcp peer
            for offset, length in REGIONS:
                got = child.copy("shm", KvLocation(offset, length, staging.key))
                assert got == as_bytes(staging.tensor[:, :, offset:offset + length])
    finally:
        staging.close()
    assert not os.path.exists(staging.key)


def test_tcp_handoff_between_processes():
    staging = allocate_staging(SHAPE, torch.bfloat16, "cpu", "tcp", "prefill-1")
    assert staging.key == "tcp:prefill-1"
    fill(staging, 1)
    with decode_child() as child:
        assert child.open(staging.export()) == -1
        for offset, length in REGIONS:
            region = staging.tensor[:, :, offset:offset + length]
            want, frames = as_bytes(region), staging.frames(offset, length)
            region.zero_()  # the region is refilled while ZMQ may still send: frames are a copy
            assert child.copy("tcp", KvLocation(offset, length, staging.key), frames) == want
    staging.close()


def test_shm_file_is_unlinked_when_the_prefill_process_exits_without_close():
    script = ("import torch; from splitserve.common.kv_transport import allocate_staging; "
              "print(allocate_staging((1, 2, 4, 1, 8), torch.float32, 'cpu', 'shm', 'p').key)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True)
    path = out.stdout.strip()
    assert path and not os.path.exists(path)


def test_a_killed_prefill_workers_shm_staging_is_found_and_removed():
    script = ("import sys, torch; from splitserve.common.kv_transport import allocate_staging; "
              "print(allocate_staging((1, 2, 4, 1, 8), torch.float32, 'cpu', 'shm', 'p').key, flush=True); "
              "sys.stdin.read()")
    owners = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    paths = [p.stdout.readline().strip() for p in owners]
    importer = KvImporter("cpu", torch.float32)
    try:
        for path in paths:
            importer.open({"transport": "shm", "key": path, "shape": [1, 2, 4, 1, 8], "dtype": "float32",
                           "layout": "head_major"})
        assert not any(owner_gone(p, min_age_s=0) for p in paths)  # alive: their locks are held
        assert owner_gone(paths[0]) is False  # and a fresh file is never judged, whoever holds it
        for p in owners:
            p.kill()
            p.wait()
        assert importer.drop_orphans(min_age_s=0) == [paths[0], paths[1]]
        assert not any(os.path.exists(p) for p in paths)
    finally:
        for p in owners:
            if p.poll() is None:
                p.kill()
                p.wait()
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


def test_sweep_removes_only_files_whose_owner_died():
    live = allocate_staging((1, 2, 4, 1, 8), torch.float32, "cpu", "shm", "live")
    script = ("import os, torch; from splitserve.common.kv_transport import allocate_staging; "
              "print(allocate_staging((1, 2, 4, 1, 8), torch.float32, 'cpu', 'shm', 'dead').key, flush=True); "
              "os._exit(0)")  # like SIGKILL: no atexit cleanup
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20,
                          check=True).stdout.strip()
    try:
        assert os.path.exists(dead)
        assert sweep_orphan_staging(os.path.dirname(dead), min_age_s=0) >= 1
        assert not os.path.exists(dead) and os.path.exists(live.key)
    finally:
        live.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_handoff_between_processes():
    staging = allocate_staging(SHAPE, torch.bfloat16, "cuda:0", "cuda_ipc", "prefill-2")
    desc = staging.export()
    assert roundtrip(desc) == desc and desc["gpu_uuid"] in gpu_uuids()
    with decode_child("cuda:0") as child:
        assert child.open(desc) == -1
        fill(staging, 2)
        staging.record_write()
        for offset, length in REGIONS:
            got = child.copy("cuda_ipc", KvLocation(offset, length, staging.key))
            assert got == as_bytes(staging.tensor[:, :, offset:offset + length])
    staging.close()


# ---- in one process -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_description_survives_msgpack_and_views_match(transport):
    staging = allocate_staging(SHAPE, torch.float32, "cpu", transport, "w")
    fill(staging, 3)
    desc = staging.export()
    assert roundtrip(desc) == desc
    importer = KvImporter("cpu", torch.float32)
    importer.open(roundtrip(desc))
    for offset, length in REGIONS:
        kv = importer.view(transport, staging.key, offset, length, staging.frames(offset, length))
        assert kv.shape == (3, 2, length, 1, 8)
        assert torch.equal(kv, staging.tensor[:, :, offset:offset + length])
    importer.close()
    staging.close()


def test_view_refuses_what_does_not_fit():
    staging = allocate_staging(SHAPE, torch.float32, "cpu", "shm", "w")
    importer = KvImporter("cpu", torch.float32)
    with pytest.raises(ValueError, match="never opened"):
        importer.view("shm", staging.key, 0, 1)
    importer.open(staging.export())
    with pytest.raises(ValueError, match="outside"):
        importer.view("shm", staging.key, BUDGET - 2, 3)
    with pytest.raises(ValueError, match="opened for shm"):
        importer.view("cuda_ipc", staging.key, 0, 1)
    with pytest.raises(ValueError, match="bytes"):
        importer.view("tcp", staging.key, 0, 2, staging.frames(0, 3))
    with pytest.raises(ValueError, match="frames"):
        importer.view("tcp", staging.key, 0, 2)
    with pytest.raises(ValueError, match="decodes in"):
        KvImporter("cpu", torch.bfloat16).open(staging.export())
    importer.close()
    staging.close()


def test_open_of_a_vanished_shm_file_fails_without_creating_it():
    staging = allocate_staging(SHAPE, torch.float32, "cpu", "shm", "w")
    desc = staging.export()
    staging.close()
    staging.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        KvImporter("cpu", torch.float32).open(desc)
    assert not os.path.exists(desc["key"])


def test_allocate_refuses_a_device_the_transport_cannot_carry():
    with pytest.raises(ValueError, match="CPU memory"):
        allocate_staging(SHAPE, torch.float32, "cuda", "shm", "w")
    with pytest.raises(ValueError, match="CUDA device"):
        allocate_staging(SHAPE, torch.float32, "cpu", "cuda_ipc", "w")
    with pytest.raises(ValueError, match="unknown"):
        allocate_staging(SHAPE, torch.float32, "cpu", "rdma", "w")


def test_gpu_identity():
    if not torch.cuda.is_available():
        assert gpu_uuids() == []
