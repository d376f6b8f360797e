"""How KV bytes move from a prefill worker's staging buffer to a decode worker (the handoff's
protocol is kv_handoff.py's): the prefill worker owns the staging buffer, the decode worker
copies out of it, and each side writes only its own memory.

- `cuda_ipc`: the staging storage is exported once as a CUDA IPC handle (the bytes and ints of
  `UntypedStorage._share_cuda_()`, never a pickled tensor) and opened once by each decode worker;
  an interprocess CUDA event orders the prefill's writes before the decode's read.
- `shm`: a file in /dev/shm that each side maps once. Its creator holds an exclusive flock on it
  for life, so anyone can tell a file whose worker died (SIGKILL skips the cleanup) and remove it.
- `tcp`: a region's bytes travel as one ZMQ frame.
- `nixl`: the staging memory is registered with a NIXL agent (UCX underneath: RDMA, NVLink, TCP or
  shared memory, whatever the machines have), and so is the decode worker's KV pool; the decode
  worker reads a prompt's KV straight from the sender's staging into its slot, one-sided. Agent
  metadata travels in the staging's description (bytes in MessagePack), transfer descriptors are
  computed on the decode side from plain integers (base address, shape, offset, length): NIXL's
  own serialized descriptors and its metadata listener use pickle and are not used.

Layout: staging is stored head-major, [n_layer, 2, KVH, budget, D], and `Staging.tensor` is the
token-major view [n_layer, 2, budget, KVH, D] of it that the prefill writes through. A prompt's
region is then, per (layer, K/V, KV head), one contiguous run of tokens, as in a decode slot of
the pool (per group of layers [n, 2, S, KVH, L, D]): a NIXL read is n * 2 * KVH descriptors, one
per run, and every transport's copy into a slot moves whole runs.

`Staging.export()` describes a staging buffer with str/int/bool/bytes/lists only, so it travels
as MessagePack. Importing this module never touches CUDA, nor NIXL.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import ipaddress
import logging
import math
import mmap
import os
import re
import secrets
import socket
import struct
import tempfile
import time

import msgspec
import numpy as np
import torch

from .service_config import NIXL_MISSING, nixl_modules

log = logging.getLogger(__name__)

# Every staging buffer is stored head-major (see the module's docstring); its description says so,
# and an importer refuses any other layout.
LAYOUT = "head_major"


_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()

# shm files this process created -> its pid. A forked child inherits the atexit hook, and must
# not unlink its parent's files when it exits.
_owned_files: dict[str, int] = {}


@atexit.register
def _unlink_owned_files() -> None:
    for path, pid in list(_owned_files.items()):
        if pid == os.getpid():
            _unlink(path)


def _unlink(path: str) -> None:
    _owned_files.pop(path, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- prefill side -------------------------------------------------------------------------


class Staging:
    """The prefill worker's staging buffer and what a decode worker needs to open it."""

    def __init__(self, tensor: torch.Tensor, transport: str, key: str, shared: dict | None = None,
                 event=None, lock_fd: int | None = None, name: str = ""):
        self.tensor = tensor  # [n_layer, 2, budget, KVH, D], a view of head-major storage
        self.transport = transport
        self.key = key  # what KvLocation.staging carries
        self.name = name or key  # the worker's id
        self._shared = shared or {}  # the transport's own export fields
        self._event = event  # cuda_ipc: interprocess event recorded after each prefill write
        self._lock_fd = lock_fd  # shm: holds the file's flock while this worker lives
        self.nixl: NixlAgent | None = None  # set by register_nixl: this staging can be read over NIXL
        self._nixl_shared: dict = {}

    def _describe(self, transport: str, key: str) -> dict:
        return {"transport": transport, "key": key, "shape": list(self.tensor.shape),
                "dtype": _dtype_name(self.tensor.dtype), "layout": LAYOUT}

    def export(self) -> dict:
        if self.transport == "nixl":
            return self.nixl_export()
        return self._describe(self.transport, self.key) | self._shared

    def exports(self) -> list[dict]:
        """Every description of this staging, the native one first: what a decode worker is sent,
        so that it opens whichever it can (a remote one cannot open shm or cuda_ipc)."""
        out = [self.export()]
        if self.nixl is not None and self.transport != "nixl":
            out.append(self.nixl_export())
        return out + [self.tcp_export()]

    def key_for(self, transport: str) -> str:
        """What KvLocation.staging carries for a handoff over `transport`."""
        if transport == "tcp":
            return self.tcp_key
        if transport == "nixl":
            return self.nixl_key
        return self.key

    @property
    def tcp_key(self) -> str:
        return self.key if self.transport == "tcp" else "tcp:" + self.key

    @property
    def nixl_key(self) -> str:
        """By the worker's id alone: a restarted worker's description replaces its old one (and
        the old agent) on every decode worker, whatever its native staging."""
        return f"nixl:{self.name}"

    def tcp_export(self) -> dict:
        """The description a remote decode worker needs: shape and dtype for the frames."""
        return self._describe("tcp", self.tcp_key)

    def register_nixl(self, agent: NixlAgent) -> None:
        """Register the staging memory with `agent`, so that decode workers can read it over NIXL."""
        storage = self.tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        agent.register(address, nbytes, self.tensor.device)
        self.nixl = agent
        self._nixl_shared = {"agent": agent.name, "metadata": agent.metadata(), "address": address,
                             "nbytes": nbytes, "device": agent.device_id(self.tensor.device),
                             "memory": agent.memory_kind(self.tensor.device)}

    def nixl_export(self) -> dict:
        if self.nixl is None:
            raise ValueError("this staging is not registered with a NIXL agent")
        return self._describe("nixl", self.nixl_key) | self._nixl_shared

    def frames(self, offset: int, length: int, kept: tuple[int, ...] = ()) -> list:
        """The region's bytes as one contiguous CPU buffer for `send(copy=False)`, head-major
        ([n_layer, 2, KVH, length, D]), or with `kept` layer l's last kept[l] tokens only, layer
        after layer. Works for any staging, so a worker whose local peers use shm or cuda_ipc can
        still serve a remote one. Always a copy: ZMQ may still be sending it after the region is
        refilled."""
        region = _region(self.tensor, offset, length).transpose(2, 3)  # [n_layer, 2, KVH, length, D]
        pieces = [region[layer, :, :, length - k :] for layer, k in enumerate(kept)] if kept else [region]
        host = torch.empty(sum(p.numel() for p in pieces), dtype=region.dtype, pin_memory=region.is_cuda)
        at = 0
        for piece in pieces:
            host[at : at + piece.numel()].view(piece.shape).copy_(piece)
            at += piece.numel()
        # numpy, because tensors lack the buffer protocol; uint8, because numpy lacks bfloat16
        return [host.view(torch.uint8).numpy()]

    def record_write(self) -> None:
        """Call after the prefill's writes into staging were queued and before sending KvReady."""
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.tensor.device))
        if self.nixl is not None and self.tensor.is_cuda:
            # a NIXL read sees device memory, not the stream: the writes must have landed
            torch.cuda.current_stream(self.tensor.device).synchronize()

    def close(self) -> None:
        if self.nixl is not None:
            self.nixl.close()
            self.nixl = None
        if self.transport == "shm":
            _unlink(self.key)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.tensor = None
        self._event = None


def allocate_staging(shape, dtype: torch.dtype, device, transport: str, name: str) -> Staging:
    """`name` (the worker id) goes into the shm file name and the key, for people and for
    uniqueness across workers."""
    device = torch.device(device)
    if transport == "shm":
        if device.type != "cpu":
            raise ValueError(f"shm staging lives in CPU memory, not on {device}")
        return _shm_staging(tuple(shape), dtype, name)
    if transport == "cuda_ipc":
        if device.type != "cuda":
            raise ValueError(f"cuda_ipc staging lives on a CUDA device, not on {device}")
        return _cuda_ipc_staging(tuple(shape), dtype, device, name)
    if transport in ("tcp", "nixl"):
        storage = torch.empty(_storage_shape(shape), dtype=dtype, device=device)
        return Staging(_token_major(storage), transport, f"{transport}:{name}", name=name)
    raise ValueError(f"unknown KV transport {transport!r}")


def _storage_shape(shape) -> tuple:
    """[n_layer, 2, budget, KVH, D] -> the head-major storage's [n_layer, 2, KVH, budget, D]."""
    n_layer, two, budget, kvh, d = shape
    return (n_layer, two, kvh, budget, d)


def _token_major(storage: torch.Tensor) -> torch.Tensor:
    """Head-major storage [n_layer, 2, KVH, budget, D] seen as [n_layer, 2, budget, KVH, D]."""
    return storage.permute(0, 1, 3, 2, 4)


def _shm_staging(shape: tuple, dtype: torch.dtype, name: str) -> Staging:
    numel = math.prod(shape)
    path = os.path.join(_SHM_DIR, f"{SHM_PREFIX}{_safe(name)}-{os.getpid()}-{secrets.token_hex(4)}")
    # O_EXCL: never adopt a file that another process left behind
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _owned_files[path] = os.getpid()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _reserve(fd, numel * dtype.itemsize)
        tensor = _token_major(torch.from_file(path, shared=True, size=numel, dtype=dtype).view(_storage_shape(shape)))
    except BaseException:
        _unlink(path)
        os.close(fd)
        raise
    return Staging(tensor, "shm", path, lock_fd=fd, name=name)


SHM_PREFIX = "splitserve-kv-"
# A file this young may be one whose creator has not taken its lock yet.
_ORPHAN_MIN_AGE_S = 10.0


def owner_gone(path: str, min_age_s: float = _ORPHAN_MIN_AGE_S) -> bool:
    """Whether the worker that created this staging file has exited (or the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        if time.time() - os.fstat(fd).st_ctime < min_age_s:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the lock, if we got it


def sweep_orphan_staging(directory: str = _SHM_DIR, min_age_s: float = _ORPHAN_MIN_AGE_S) -> int:
    """Remove the shm staging files of dead workers; returns how many."""
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(SHM_PREFIX) and path not in _owned_files and owner_gone(path, min_age_s):
            _unlink(path)
            removed += 1
    return removed


def _reserve(fd: int, nbytes: int) -> None:
    # Reserving the pages up front makes a too-small /dev/shm (Docker's default is 64 MiB) fail
    # here with ENOSPC, instead of killing the process with SIGBUS on some later write.
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
    else:
        os.ftruncate(fd, nbytes)


def _cuda_ipc_staging(shape: tuple, dtype: torch.dtype, device: torch.device, name: str) -> Staging:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = _token_major(torch.empty(_storage_shape(shape), dtype=dtype, device=device))
    with torch.cuda.device(device):
        event = torch.cuda.Event(interprocess=True)
    # Recorded once now, so a reader that waits before the first prefill write does not block.
    event.record(torch.cuda.current_stream(device))
    # (device, handle, size, offset, ref counter handle, ref counter offset, event handle,
    #  event_sync_required): exported once, so every decode worker opens the same handle.
    pieces = list(tensor.untyped_storage()._share_cuda_())  # storage_offset is 0: the storage is the tensor's
    shared = {"gpu_uuid": _uuid(device.index), "storage": pieces,
              "storage_offset": tensor.storage_offset(), "event": event.ipc_handle()}
    return Staging(tensor, "cuda_ipc", f"cuda_ipc:{name}:{os.getpid()}", shared, event, name=name)


# ---- decode side --------------------------------------------------------------------------


class _Opened:
    def __init__(self, desc: dict, tensor: torch.Tensor | None = None, event=None):
        self.desc = desc
        self.transport = desc["transport"]
        self.shape, self.dtype = _shape_dtype(desc)
        self.tensor = tensor  # shm, cuda_ipc: the whole staging [n_layer, 2, budget, KVH, D]
        self.event = event  # cuda_ipc: the prefill's write event
        self.nixl: NixlStaging | None = None  # nixl: where the staging lives, in the sender's agent
        self.peer = ""  # nixl: the sender's agent, as loaded into ours
        self.runs: np.ndarray | None = None  # nixl: the descriptors of the staging's runs at offset 0


class NixlStaging(msgspec.Struct):
    """The integers (and the agent metadata) of a staging's `nixl` description: everything a
    decode worker needs to compute the descriptors of a one-sided read from it."""

    agent: str  # the sender's agent name
    metadata: bytes  # its agent metadata (NIXL's own bytes, with the staging's registration)
    address: int  # where the head-major storage [n_layer, 2, KVH, budget, D] begins
    nbytes: int
    device: int  # GPU index in the sender's process (0 for host memory)
    memory: str  # "DRAM" or "VRAM"


class KvImporter:
    """The decode worker's side: opens each prefill worker's staging once and hands out the
    KV of one prompt at a time, as a tensor for `DecodeEngine.admit` to copy from, or (nixl)
    reads it straight into the slot.

    On cuda_ipc that copy is asynchronous: synchronize the copying stream before sending
    KvRelease, or the prefill worker may overwrite the region mid-copy."""

    def __init__(self, device, dtype: torch.dtype, nixl: NixlAgent | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.nixl = nixl  # this worker's agent, its KV pool registered: can read nixl stagings
        self._opened: dict[str, _Opened] = {}
        self._runs: dict[tuple, np.ndarray] = {}  # nixl: a slot view's descriptors, by its address and strides

    def open(self, desc: dict) -> None:
        """Idempotent; a changed description under a known key (a restarted tcp or nixl peer)
        replaces the old one (nixl: the old agent is unloaded, the new one loaded)."""
        old = self._opened.get(desc["key"])
        if old is not None and old.desc == desc:
            return
        if desc.get("layout") != LAYOUT:
            raise ValueError(f"staging {desc['key']!r} is laid out {desc.get('layout', 'token-major')!r}, "
                             f"this worker reads {LAYOUT!r} (a peer of another version?)")
        _, dtype = _shape_dtype(desc)
        if dtype != self.dtype:
            raise ValueError(f"staging {desc['key']!r} holds {dtype}, this worker decodes in {self.dtype}")
        if desc["transport"] == "nixl":
            opened = self._open_nixl(desc)
        else:
            opener = _OPENERS.get(desc["transport"])
            if opener is None:
                raise ValueError(f"unknown KV transport {desc['transport']!r}")
            opened = opener(desc)
        if old is not None and old.peer and old.peer != opened.peer:
            self.nixl.remove_peer(old.peer)  # a restarted sender's stale agent
        self._opened[desc["key"]] = opened

    def _open_nixl(self, desc: dict) -> _Opened:
        if self.nixl is None:
            raise ValueError("this worker has no NIXL agent (--kv-transport shm, cuda_ipc or tcp, or NIXL is missing)")
        opened = _Opened(desc)
        try:
            opened.nixl = msgspec.convert(desc, NixlStaging, from_attributes=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"a bad nixl staging description: {e}") from None
        budget_bytes = math.prod(opened.shape) * opened.dtype.itemsize
        if opened.nixl.nbytes != budget_bytes or opened.nixl.memory not in ("DRAM", "VRAM"):
            raise ValueError(f"nixl staging {desc['key']!r}: {opened.nixl.nbytes} bytes of {opened.nixl.memory}, "
                             f"its shape needs {budget_bytes}")
        # The agent is loaded (and connected to) at the first read from it: with auto, a worker on
        # the same host reads over shm and never needs it, and opening stays quick.
        return opened

    def _load_peer(self, opened: _Opened) -> str:
        if not opened.peer:
            peer = self.nixl.add_peer(opened.nixl.metadata)
            if peer != opened.nixl.agent:
                self.nixl.remove_peer(peer)
                raise ValueError(f"nixl staging {opened.desc['key']!r} names agent {opened.nixl.agent!r}, its "
                                 f"metadata {peer!r}")
            opened.peer = peer
        return opened.peer

    def read(self, key: str, offset: int, length: int, dst: torch.Tensor, timeout_s: float,
             layers: slice = slice(None)) -> int:
        """nixl: read staging[offset : offset + length] of the sender's staging, for the model's
        `layers`, straight into `dst`, a [n, 2, KVH, length, D] view of this worker's registered
        pool whose last two dims are contiguous (a slot's first `length` tokens of those n layers);
        one-sided, no copy in between. Returns the bytes read; raises NixlError when the read fails
        or takes longer than `timeout_s`."""
        opened = self._opened.get(key)
        if opened is None:
            raise ValueError(f"KV staging {key!r} was never opened")
        if opened.nixl is None:
            raise ValueError(f"staging {key!r} was opened for {opened.transport}, not nixl")
        n_layer, two, budget, kvh, d = opened.shape
        if offset < 0 or length < 1 or offset + length > budget:
            raise ValueError(f"KV region [{offset}, {offset + length}) is outside the staging's {budget} tokens")
        count = len(range(n_layer)[layers])
        if tuple(dst.shape) != (count, two, kvh, length, d) or dst.dtype != opened.dtype:
            raise ValueError(f"a read of {length} tokens lands in [{count}, {two}, {kvh}, {length}, {d}] "
                             f"{opened.dtype}, not {list(dst.shape)} {dst.dtype}")
        isz = opened.dtype.itemsize
        if opened.runs is None:
            # the sender's head-major storage: run (l, c, h) starts at ((l*2 + c)*KVH + h)*budget*D,
            # plus offset*D; made once per staging, as the slots' are once per slot
            opened.runs = nixl_runs(opened.nixl.address, (n_layer, two, kvh), (two * kvh * budget * d * isz,
                                    kvh * budget * d * isz, budget * d * isz), 0, opened.nixl.device)
        src = opened.runs.reshape(n_layer, two * kvh, 3)[layers].reshape(-1, 3).copy()  # runs (l, c, h)
        src[:, 0] += np.uint64(offset * d * isz)
        src[:, 1] = length * d * isz
        return self.nixl.read(self._load_peer(opened), self._slot_runs(dst), src, opened.nixl.memory, timeout_s)

    def _slot_runs(self, dst: torch.Tensor) -> np.ndarray:
        """tensor_runs(dst), from a cache of each slot's run starts (a slot is a fixed place in the pool)."""
        key = (dst.data_ptr(), dst.stride(), tuple(dst.shape[:-2]))
        runs = self._runs.get(key)
        if runs is None:
            if len(self._runs) > 4096:
                self._runs.clear()
            runs = self._runs[key] = tensor_runs(dst)
        runs = runs.copy()
        runs[:, 1] = dst.shape[-2] * dst.shape[-1] * dst.element_size()
        return runs

    def view(self, transport: str, key: str, offset: int, length: int, frames: list | None = None,
             kept: tuple[int, ...] = ()) -> torch.Tensor:
        """[n_layer, 2, length, KVH, D]. shm, cuda_ipc: a view into the prefill worker's
        staging, valid until KvRelease; tcp: a tensor over the frames, on this worker's device
        (with `kept`, layer l's last kept[l] tokens; its others zeros, which no step reads)."""
        opened = self._opened.get(key)
        if opened is None:
            raise ValueError(f"KV staging {key!r} was never opened")
        if transport == "tcp":
            return self._from_frames(opened, length, frames, kept)
        if transport == "nixl":
            raise ValueError("nixl KV is read into its slot (KvImporter.read), never viewed")
        if transport != opened.transport:
            raise ValueError(f"staging {key!r} was opened for {opened.transport}, not {transport}")
        kv = _region(opened.tensor, offset, length)
        if opened.event is not None:
            for stream in self._copy_streams(kv.device):
                stream.wait_event(opened.event)
        return kv

    def drop(self, key: str) -> None:
        """Forget a staging whose prefill worker has gone (unmaps it once no view is left; nixl:
        unloads its agent)."""
        opened = self._opened.pop(key, None)
        if opened is not None and opened.peer and self.nixl is not None:
            self.nixl.remove_peer(opened.peer)

    def drop_orphans(self, min_age_s: float = _ORPHAN_MIN_AGE_S) -> list[str]:
        """Unmap (and remove) the shm stagings whose prefill worker died; returns their keys."""
        dead = [k for k, o in self._opened.items() if o.transport == "shm" and owner_gone(k, min_age_s)]
        for key in dead:
            _unlink(key)
            self.drop(key)
        return dead

    def close(self) -> None:
        # Unmapping happens when the last tensor over a mapping goes; the files are not ours.
        for key in list(self._opened):
            self.drop(key)
        if self.nixl is not None:
            self.nixl.close()
            self.nixl = None

    def _from_frames(self, opened: _Opened, length: int, frames: list | None, kept: tuple[int, ...]) -> torch.Tensor:
        if not frames:
            raise ValueError("the tcp transport needs the KV frames")
        bufs = [getattr(f, "buffer", f) for f in frames]  # zmq.Frame -> its (writable) memoryview
        buf = bufs[0] if len(bufs) == 1 else bytearray().join(bufs)
        n_layer, two, _, kvh, d = opened.shape
        shape = (n_layer, two, kvh, length, d)  # head-major, as Staging.frames sends it
        if kept and (len(kept) != n_layer or not all(0 < k <= length for k in kept)):
            raise ValueError(f"KV frames keep {list(kept)} tokens per layer; {n_layer} counts of 1 to {length} "
                             "make sense")
        want = (sum(kept) if kept else n_layer * length) * two * kvh * d * opened.dtype.itemsize
        if memoryview(buf).nbytes != want:
            raise ValueError(f"KV frames hold {memoryview(buf).nbytes} bytes, {length} tokens need {want}")
        flat = torch.frombuffer(buf, dtype=opened.dtype)
        if not kept:
            return _token_major(flat.view(shape).to(self.device))
        kv, at = torch.zeros(shape, dtype=opened.dtype), 0
        for layer, k in enumerate(kept):
            piece = kv[layer, :, :, length - k :]
            piece.copy_(flat[at : at + piece.numel()].view(piece.shape))
            at += piece.numel()
        return _token_major(kv.to(self.device))

    def _copy_streams(self, source: torch.device) -> list:
        # A copy between devices runs on the source device's current stream, one within a
        # device on that device's: wait on both so admit's copy sees the prefill's writes.
        devices = {source} | ({self.device} if self.device.type == "cuda" else set())
        return [torch.cuda.current_stream(dev) for dev in devices]


def _open_shm(desc: dict) -> _Opened:
    opened = _Opened(desc)
    nbytes = math.prod(opened.shape) * opened.dtype.itemsize
    # Not torch.from_file: it creates a missing file, which would leave an orphan in /dev/shm.
    fd = os.open(desc["key"], os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(f"{desc['key']} holds {size} bytes, its description says {nbytes}")
        mapping = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    # The tensor keeps the mapping alive; it unmaps when the last view goes.
    opened.tensor = _token_major(torch.frombuffer(mapping, dtype=opened.dtype).view(_storage_shape(opened.shape)))
    return opened


def _open_cuda_ipc(desc: dict) -> _Opened:
    opened = _Opened(desc)
    # The handle's device index is the prefill process's; this process may number GPUs differently.
    index = _local_index(desc["gpu_uuid"])
    _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = desc["storage"]
    torch.cuda._lazy_init()  # _new_shared_cuda assumes an initialized CUDA state
    storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref_handle, ref_offset,
                                                    event_handle, bool(event_sync))
    tensor = torch.empty(0, dtype=opened.dtype, device=torch.device("cuda", index))
    opened.tensor = _token_major(tensor.set_(storage, desc["storage_offset"], _storage_shape(opened.shape)))
    opened.event = torch.cuda.Event.from_ipc_handle(index, desc["event"])
    return opened


_OPENERS = {"shm": _open_shm, "cuda_ipc": _open_cuda_ipc, "tcp": _Opened}


# ---- NIXL ---------------------------------------------------------------------------------


class NixlError(RuntimeError):
    """A NIXL read failed or did not complete in time. `slot_unsafe`: the read could not be
    cancelled, so its destination may still be written to; `disconnected`: the peer is gone."""

    def __init__(self, message: str, slot_unsafe: bool = False, disconnected: bool = False):
        super().__init__(message)
        self.slot_unsafe, self.disconnected = slot_unsafe, disconnected


class NixlUnavailable(ValueError):
    """NIXL is not installed, or its agent (with the UCX backend) could not be created."""


# How long the UCX backend's progress thread waits between polls while idle, in microseconds:
# NIXL's Python wrapper sets 0, a progress thread that keeps a core busy even with nothing to do.
PROGRESS_DELAY_US = 100


def nixl_bindings():
    """The NIXL bindings of the installed wheel (nixl-cu13 or nixl-cu12), the one matching
    PyTorch's CUDA first. The bindings module itself, not NIXL's Python wrapper: the wrapper fixes
    the progress thread's delay at 0 (a busy core), and this module needs none of what it adds."""
    cuda = (torch.version.cuda or "").split(".")[0]
    names = nixl_modules()
    order = sorted(names, key=lambda n: not n.endswith(f"cu{cuda}")) if cuda else names
    errors = []
    for name in order:
        try:
            return importlib.import_module(f"{name}._bindings")
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise NixlUnavailable(NIXL_MISSING + (f" ({'; '.join(errors)})" if errors else ""))


class NixlAgent:
    """One NIXL agent with the UCX backend: registers this process's memory (staging or KV pool),
    loads peers' metadata and reads from them. Used from one thread. `progress_thread`: the
    backend's own thread that serves the reads of others, needed on the side read from (where UCX
    emulates one-sided reads, as over TCP); a reader progresses its own reads while it waits.

    `host`: the address this worker binds (--host, or --advertise-host where --host is a
    wildcard): UCX's network transports use the interface holding it (UCX_NET_DEVICES, with the
    RDMA devices kept), unless UCX_NET_DEVICES is set already."""

    def __init__(self, name: str, host: str = "", progress_thread: bool = True):
        B = self._b = nixl_bindings()
        self.name = name
        if host and "UCX_NET_DEVICES" not in os.environ:
            devices = ucx_net_devices(host)
            if devices:
                os.environ["UCX_NET_DEVICES"] = devices
            else:
                log.warning("no network interface holds %s: UCX may use every interface", host)
        cfg = B.nixlAgentConfig()
        cfg.useProgThread, cfg.useListenThread = progress_thread, False  # NIXL's listener speaks pickle: never
        cfg.syncMode = B.NIXL_THREAD_SYNC_NONE
        cfg.pthrDelay, cfg.captureTelemetry = PROGRESS_DELAY_US, False
        try:
            self._agent = B.nixlAgent(name, cfg)
            plugins = list(self._agent.getAvailPlugins())
            if "UCX" not in plugins:
                raise NixlUnavailable(f"could not create a NIXL agent: NIXL finds no UCX backend plugin (plugins: "
                                      f"{', '.join(plugins) or 'none'}; NIXL_PLUGIN_DIR="
                                      f"{os.environ.get('NIXL_PLUGIN_DIR', 'unset')})")
            self._backend = self._agent.createBackend("UCX", {})
        except NixlUnavailable:
            raise
        except Exception as e:
            raise NixlUnavailable(f"could not create a NIXL agent with the UCX backend: {type(e).__name__}: {e}") from e
        self._regs: list = []
        self._stuck: list[int] = []  # transfers that timed out and could not be cancelled
        self._local_kind = "DRAM"  # where reads land: register_pool

    @staticmethod
    def memory_kind(device: torch.device) -> str:
        return "VRAM" if device.type == "cuda" else "DRAM"

    @staticmethod
    def device_id(device: torch.device) -> int:
        return (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 0

    def register(self, address: int, nbytes: int, device: torch.device) -> None:
        B = self._b
        regs = B.nixlRegDList(self._seg(self.memory_kind(device)), [(address, nbytes, self.device_id(device), "")])
        try:
            self._agent.registerMem(regs, [self._backend])
        except Exception as e:
            raise NixlUnavailable(f"NIXL could not register {nbytes} bytes of {device} memory: {e}") from e
        self._regs.append(regs)

    def register_pool(self, pool: torch.Tensor) -> None:
        """Register the decode worker's KV pool: where this agent's reads land."""
        storage = pool.untyped_storage()
        self.register(storage.data_ptr(), storage.nbytes(), pool.device)
        self._local_kind = self.memory_kind(pool.device)

    def metadata(self) -> bytes:
        """This agent's metadata, with every registration so far: what a peer loads to read from it."""
        return bytes(self._agent.getLocalMD())

    def add_peer(self, metadata: bytes) -> str:
        name = self._agent.loadRemoteMD(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            self._agent.makeConnection(name, [self._backend])  # now, not in the first read
        except Exception as e:
            log.warning("NIXL could not connect to agent %s ahead of a read: %s", name, e)
        return name

    def remove_peer(self, name: str) -> None:
        try:
            self._agent.invalidateRemoteMD(name)
        except Exception as e:
            log.warning("NIXL could not unload agent %s: %s", name, e)

    def read(self, peer: str, local: np.ndarray, remote: np.ndarray, remote_memory: str, timeout_s: float) -> int:
        """READ the peer's `remote` runs into our `local` ones (Nx3 arrays of address, bytes,
        device; equal lengths row by row) and wait for completion; -> the bytes read."""
        B = self._b
        handle = None
        try:
            handle = self._agent.createXferReq(B.NIXL_READ, B.nixlXferDList(self._seg(self._local_kind), local),
                                               B.nixlXferDList(self._seg(remote_memory), remote), peer, "",
                                               [self._backend])
            status = self._agent.postXferReq(handle, "")
            deadline = time.monotonic() + timeout_s
            while status == B.NIXL_IN_PROG:
                if time.monotonic() > deadline:
                    raise NixlError(f"the NIXL read of {int(local[:, 1].sum())} bytes from {peer} did not complete "
                                    f"within {timeout_s:g} s")
                status = self._agent.getXferStatus(handle)
            if status != B.NIXL_SUCCESS:
                raise NixlError(f"the NIXL read from {peer} failed: {status}")
        except NixlError as e:
            if handle is not None and not self._release(handle):
                raise NixlError(str(e), slot_unsafe=True) from None
            handle = None
            raise
        except Exception as e:  # the bindings raise per status (a remote disconnect, an unknown agent, ...)
            message = f"the NIXL read from {peer} failed: {type(e).__name__}: {e}"
            gone = "Disconnect" in type(e).__name__
            if handle is not None and not self._release(handle):
                raise NixlError(message, slot_unsafe=True, disconnected=gone) from None
            raise NixlError(message, disconnected=gone) from None
        self._release(handle)
        return int(local[:, 1].sum())

    def _release(self, handle: int) -> bool:
        """Release (cancelling it if still running) a transfer; False if NIXL could not."""
        try:
            self._agent.releaseXferReq(handle)
            return True
        except Exception as e:
            log.error("NIXL could not release (cancel) a transfer: %s", e)
            self._stuck.append(handle)
            return False

    def _seg(self, kind: str):
        return {"DRAM": self._b.DRAM_SEG, "VRAM": self._b.VRAM_SEG}[kind]

    def close(self) -> None:
        for handle in self._stuck:
            try:
                self._agent.releaseXferReq(handle)
            except Exception:
                pass
        self._stuck.clear()
        for regs in self._regs:
            try:
                self._agent.deregisterMem(regs, [self._backend])
            except Exception as e:
                log.warning("NIXL could not deregister memory: %s", e)
        self._regs.clear()


def nixl_runs(base: int, counts: tuple, strides: tuple, run_bytes: int, device: int) -> np.ndarray:
    """Nx3 (address, bytes, device) descriptors of equal runs: one per index over `counts`, at
    `base` plus the index dotted with `strides` (bytes), in row-major order of the index."""
    addresses = np.full((), base, dtype=np.uint64)
    for count, stride in zip(counts, strides):
        addresses = np.add.outer(addresses, np.arange(count, dtype=np.uint64) * np.uint64(stride))
    out = np.empty((addresses.size, 3), dtype=np.uint64)
    out[:, 0], out[:, 1], out[:, 2] = addresses.reshape(-1), run_bytes, device
    return out


def tensor_runs(dst: torch.Tensor) -> np.ndarray:
    """The contiguous runs of `dst` [..., n, D] (its last two dims contiguous): one descriptor per
    index of the leading dims, row-major."""
    if dst.stride(-1) != 1 or dst.stride(-2) != dst.shape[-1]:
        raise ValueError(f"a NIXL read needs [..., n, D] contiguous in its last two dims, not strides {dst.stride()}")
    isz = dst.element_size()
    return nixl_runs(dst.data_ptr(), tuple(dst.shape[:-2]), tuple(s * isz for s in dst.stride()[:-2]),
                     dst.shape[-2] * dst.shape[-1] * isz, NixlAgent.device_id(dst.device))


def ucx_net_devices(host: str) -> str:
    """UCX_NET_DEVICES for a worker bound to `host`: the interface holding that address, and every
    RDMA device port (they carry no IP address to match, and are what NIXL is for). "" when no
    interface holds it (or it is a name, not an address)."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return ""
    if addr.is_unspecified:
        return ""
    interface = "lo" if addr.is_loopback else _interface_holding(addr)
    if not interface:
        return ""
    return ",".join([interface, *_rdma_ports()])


def _interface_holding(addr) -> str:
    if addr.version != 4:
        return ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == str(addr):
                return name
    return ""


def _rdma_ports(root: str = "/sys/class/infiniband") -> list[str]:
    try:
        return [f"{dev}:{port}" for dev in sorted(os.listdir(root))
                for port in sorted(os.listdir(os.path.join(root, dev, "ports")))]
    except OSError:
        return []


# ---- identity ---------------------------------------------------------------------------


def gpu_uuids() -> list[str]:
    """Visible CUDA devices' UUIDs, in this process's device order."""
    if not torch.cuda.is_available():
        return []
    return [_uuid(i) for i in range(torch.cuda.device_count())]


# ---- helpers ------------------------------------------------------------------------------


def _region(staging: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    budget = staging.shape[2]
    if offset < 0 or length < 1 or offset + length > budget:
        raise ValueError(f"KV region [{offset}, {offset + length}) is outside the staging's {budget} tokens")
    return staging[:, :, offset:offset + length]


def _shape_dtype(desc: dict) -> tuple[tuple, torch.dtype]:
    dtype = getattr(torch, desc["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {desc['dtype']!r}")
    return tuple(desc["shape"]), dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _local_index(uuid: str) -> int:
    uuids = gpu_uuids()
    if uuid not in uuids:
        raise ValueError(f"GPU {uuid} is not visible to this process (visible: {uuids})")
    return uuids.index(uuid)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
