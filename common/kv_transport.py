"""How KV bytes move from a prefill worker's staging buffer to a decode worker (the handoff's
protocol is kv_handoff.py's): the prefill worker owns the staging buffer, the decode worker
copies out of it, and each side writes only its own memory.

- `cuda_ipc`: the staging storage is exported once as a CUDA IPC handle (the bytes and ints of
  `UntypedStorage._share_cuda_()`, never a pickled tensor) and opened once by each decode worker;
  an interprocess CUDA event orders the prefill's writes before the decode's read.
- `shm`: a file in /dev/shm that each side maps once. Its creator holds an exclusive flock on it
  for life, so anyone can tell a file whose worker died (SIGKILL skips the cleanup) and remove it.
- `tcp`: a region's bytes travel as one ZMQ frame.

`Staging.export()` describes a staging buffer with str/int/bool/bytes/lists only, so it travels
as MessagePack. Importing this module never touches CUDA.
"""

from __future__ import annotations

import atexit
import fcntl
import math
import mmap
import os
import re
import secrets
import tempfile
import time

import torch


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
                 event=None, lock_fd: int | None = None):
        self.tensor = tensor  # [n_layer, 2, budget, KVH, D]
        self.transport = transport
        self.key = key  # what KvLocation.staging carries
        self._shared = shared or {}  # the transport's own export fields
        self._event = event  # cuda_ipc: interprocess event recorded after each prefill write
        self._lock_fd = lock_fd  # shm: holds the file's flock while this worker lives

    def export(self) -> dict:
        return {"transport": self.transport, "key": self.key, "shape": list(self.tensor.shape),
                "dtype": _dtype_name(self.tensor.dtype), **self._shared}

    @property
    def tcp_key(self) -> str:
        return self.key if self.transport == "tcp" else "tcp:" + self.key

    def tcp_export(self) -> dict:
        """The description a remote decode worker needs: shape and dtype for the frames."""
        return {"transport": "tcp", "key": self.tcp_key, "shape": list(self.tensor.shape),
                "dtype": _dtype_name(self.tensor.dtype)}

    def frames(self, offset: int, length: int) -> list:
        """The region's bytes as one contiguous CPU buffer for `send(copy=False)`. Works for any
        staging, so a worker whose local peers use shm or cuda_ipc can still serve a remote one.
        Always a copy: ZMQ may still be sending it after the region is refilled."""
        region = _region(self.tensor, offset, length)  # [n_layer, 2, length, KVH, D], strided
        if region.is_cuda:
            host = torch.empty(region.shape, dtype=region.dtype, pin_memory=True)
            host.copy_(region)
        else:
            host = region.clone(memory_format=torch.contiguous_format)
        # numpy, because tensors lack the buffer protocol; uint8, because numpy lacks bfloat16
        return [host.reshape(-1).view(torch.uint8).numpy()]

    def record_write(self) -> None:
        """Call after the prefill's writes into staging were queued and before sending KvReady."""
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.tensor.device))

    def close(self) -> None:
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
    if transport == "tcp":
        return Staging(torch.empty(shape, dtype=dtype, device=device), "tcp", f"tcp:{name}")
    raise ValueError(f"unknown KV transport {transport!r}")


def _shm_staging(shape: tuple, dtype: torch.dtype, name: str) -> Staging:
    numel = math.prod(shape)
    path = os.path.join(_SHM_DIR, f"{SHM_PREFIX}{_safe(name)}-{os.getpid()}-{secrets.token_hex(4)}")
    # O_EXCL: never adopt a file that another process left behind
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _owned_files[path] = os.getpid()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _reserve(fd, numel * dtype.itemsize)
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    except BaseException:
        _unlink(path)
        os.close(fd)
        raise
    return Staging(tensor, "shm", path, lock_fd=fd)


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
    tensor = torch.empty(shape, dtype=dtype, device=device)
    with torch.cuda.device(device):
        event = torch.cuda.Event(interprocess=True)
    # Recorded once now, so a reader that waits before the first prefill write does not block.
    event.record(torch.cuda.current_stream(device))
    # (device, handle, size, offset, ref counter handle, ref counter offset, event handle,
    #  event_sync_required): exported once, so every decode worker opens the same handle.
    pieces = list(tensor.untyped_storage()._share_cuda_())
    shared = {"gpu_uuid": _uuid(device.index), "storage": pieces,
              "storage_offset": tensor.storage_offset(), "event": event.ipc_handle()}
    return Staging(tensor, "cuda_ipc", f"cuda_ipc:{name}:{os.getpid()}", shared, event)


# ---- decode side --------------------------------------------------------------------------


class _Opened:
    def __init__(self, desc: dict, tensor: torch.Tensor | None = None, event=None):
        self.desc = desc
        self.transport = desc["transport"]
        self.shape, self.dtype = _shape_dtype(desc)
        self.tensor = tensor  # shm, cuda_ipc: the whole staging [n_layer, 2, budget, KVH, D]
        self.event = event  # cuda_ipc: the prefill's write event


class KvImporter:
    """The decode worker's side: opens each prefill worker's staging once and hands out the
    KV of one prompt at a time, as a tensor for `DecodeEngine.admit` to copy from.

    On cuda_ipc that copy is asynchronous: synchronize the copying stream before sending
    KvRelease, or the prefill worker may overwrite the region mid-copy."""

    def __init__(self, device, dtype: torch.dtype):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self._opened: dict[str, _Opened] = {}

    def open(self, desc: dict) -> None:
        """Idempotent; a changed description under a known key (a restarted tcp peer) replaces
        the old one."""
        old = self._opened.get(desc["key"])
        if old is not None and old.desc == desc:
            return
        _, dtype = _shape_dtype(desc)
        if dtype != self.dtype:
            raise ValueError(f"staging {desc['key']!r} holds {dtype}, this worker decodes in {self.dtype}")
        opener = _OPENERS.get(desc["transport"])
        if opener is None:
            raise ValueError(f"unknown KV transport {desc['transport']!r}")
        self._opened[desc["key"]] = opener(desc)

    def view(self, transport: str, key: str, offset: int, length: int, frames: list | None = None) -> torch.Tensor:
        """[n_layer, 2, length, KVH, D]. shm, cuda_ipc: a view into the prefill worker's
        staging, valid until KvRelease; tcp: a tensor over the frames, on this worker's device."""
        opened = self._opened.get(key)
        if opened is None:
            raise ValueError(f"KV staging {key!r} was never opened")
        if transport == "tcp":
            return self._from_frames(opened, length, frames)
        if transport != opened.transport:
            raise ValueError(f"staging {key!r} was opened for {opened.transport}, not {transport}")
        kv = _region(opened.tensor, offset, length)
        if opened.event is not None:
            for stream in self._copy_streams(kv.device):
                stream.wait_event(opened.event)
        return kv

    def drop(self, key: str) -> None:
        """Forget a staging whose prefill worker has gone (unmaps it once no view is left)."""
        self._opened.pop(key, None)

    def drop_orphans(self, min_age_s: float = _ORPHAN_MIN_AGE_S) -> list[str]:
        """Unmap (and remove) the shm stagings whose prefill worker died; returns their keys."""
        dead = [k for k, o in self._opened.items() if o.transport == "shm" and owner_gone(k, min_age_s)]
        for key in dead:
            _unlink(key)
            self.drop(key)
        return dead

    def close(self) -> None:
        # Unmapping happens when the last tensor over a mapping goes; the files are not ours.
        self._opened.clear()

    def _from_frames(self, opened: _Opened, length: int, frames: list | None) -> torch.Tensor:
        if not frames:
            raise ValueError("the tcp transport needs the KV frames")
        bufs = [getattr(f, "buffer", f) for f in frames]  # zmq.Frame -> its (writable) memoryview
        buf = bufs[0] if len(bufs) == 1 else bytearray().join(bufs)
        n_layer, two, _, kvh, d = opened.shape
        shape = (n_layer, two, length, kvh, d)
        want = math.prod(shape) * opened.dtype.itemsize
        if memoryview(buf).nbytes != want:
            raise ValueError(f"KV frames hold {memoryview(buf).nbytes} bytes, {length} tokens need {want}")
        return torch.frombuffer(buf, dtype=opened.dtype).view(shape).to(self.device)

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
    opened.tensor = torch.frombuffer(mapping, dtype=opened.dtype).view(opened.shape)
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
    opened.tensor = tensor.set_(storage, desc["storage_offset"], opened.shape)
    opened.event = torch.cuda.Event.from_ipc_handle(index, desc["event"])
    return opened


_OPENERS = {"shm": _open_shm, "cuda_ipc": _open_cuda_ipc, "tcp": _Opened}


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
