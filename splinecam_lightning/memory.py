"""How many bytes one partition may hold at once, and how many it holds.

The engine sizes its chunks of regions from these figures so that a large partition runs in pieces instead of
being killed by the kernel. Nothing here imports Lightning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import time
from typing import Any

import torch

__all__ = [
    "available_bytes",
    "default_budget",
    "held_bytes",
    "is_allocation_failure",
    "empty",
    "reuse_freed_memory",
    "release_freed_memory",
]

# Share of the free memory a partition may use by default: the rest is left to allocator slack, other
# threads and whatever the caller holds.
DEFAULT_FRACTION = 0.6


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """Room left under ``RLIMIT_AS`` (address space, not resident memory), if a limit is set."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    except OSError:
        pass
    return soft


def _cgroup_left() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if one is set."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(raw) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: free GPU memory for CUDA; for the CPU the smallest of ``MemAvailable``, the
    room under ``RLIMIT_AS`` and the room under a cgroup limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    found = [b for b in (_meminfo_available(), _address_space_left(), _cgroup_left()) if b is not None]
    return min(found) if found else 8 << 30


# Free memory is sampled at most this often (seconds) per device: reading it costs file reads (tens of
# microseconds), a visible part of a small partition, and it changes little between back-to-back calls.
_SAMPLE_SECONDS = 0.1
_sampled: dict[str, tuple[float, int]] = {}


def default_budget(device: torch.device | str = "cpu") -> int:
    """The default ``max_memory`` of :func:`~splinecam_lightning.compute_partition`: a share of the free memory
    (sampled at most every 0.1 s per device)."""
    key = str(torch.device(device))
    now = time.monotonic()
    hit = _sampled.get(key)
    if hit is None or not 0 <= now - hit[0] < _SAMPLE_SECONDS:
        hit = _sampled[key] = (now, int(available_bytes(device) * DEFAULT_FRACTION))
    return hit[1]


def _tensors(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _tensors(v, out)
    elif hasattr(obj, "__slots__"):
        for name in obj.__slots__:
            _tensors(getattr(obj, name, None), out)


def held_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``objs`` (tensors, containers, slotted objects)."""
    ts: list[torch.Tensor] = []
    for o in objs:
        _tensors(o, ts)
    seen: dict[int, int] = {}
    for t in ts:
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def is_allocation_failure(e: BaseException) -> bool:
    """True for the allocator's failures: ``MemoryError``, ``torch.OutOfMemoryError`` and the CPU allocator's
    ``RuntimeError``."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in msg or "DefaultCPUAllocator" in msg or "out of memory" in msg
    )


# ---------------------------------------------------------------------------------------------- huge pages
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_libc: Any = None


def _load_libc() -> Any:
    """The C library on Linux (``madvise``, ``mallopt``, ``malloc_trim``), else ``False``."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc


def empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape, dtype=dtype)``, on Linux CPUs hinted to use transparent huge pages before it is touched.

    The engine's per-region maps are large fresh tensors written once: faulting them in 4 KiB pages is a visible
    part of a large partition (a 54 MB tensor: ~22 ms of page faults here, ~6 ms in 2 MiB pages). torch does this
    for all its tensors only when started with ``THP_MEM_ALLOC_ENABLE=1``; this hint covers the engine's own
    largest outputs in any process. Only the tensor's own whole 2 MiB pages are advised.
    """
    t = like.new_empty(shape, dtype=dtype or like.dtype)
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and nbytes >= 2 * _HUGE_PAGE:
        libc = _load_libc()
        if libc:
            start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if end > start:
                libc.madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return t


# ---------------------------------------------------------------------------------------------- reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def reuse_freed_memory(largest: int = 1 << 30) -> bool:
    """Have the C allocator keep freed blocks of up to ``largest`` bytes for reuse (glibc; process-wide).

    By default glibc maps large blocks (from 128 KiB, a threshold that rises to at most 32 MiB as such blocks are
    freed) fresh from the OS and unmaps them when freed, so each call of the engine page-faults in its large
    per-region tensors again: about half the time of a max-pooling CNN's partition on a 2-core VM (3.3-3.9 s
    against 5.2-9.9 s per call). With this, those blocks stay in the heap and later calls reuse them;
    :func:`release_freed_memory` bounds what stays held. The snapshot worker calls it at start; call it in your
    own process only if it computes many partitions and may keep their peak memory. Returns ``False`` where the
    C library is not glibc.
    """
    libc = _load_libc()
    if not libc or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return False
    big = min(int(largest), 2**31 - 1)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, big)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory(keep: int = 0) -> int:
    """Return the heap's free memory to the OS if it holds more than ``keep`` bytes; returns the free bytes it
    held before (glibc; elsewhere 0)."""
    libc = _load_libc()
    if not libc or not hasattr(libc, "malloc_trim"):
        return 0
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
        free = int(libc.mallinfo2().fordblks)
    else:
        free = keep + 1  # no way to tell: release
    if free > keep:
        libc.malloc_trim(0)
    return free
