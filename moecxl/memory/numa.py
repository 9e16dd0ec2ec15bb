"""NUMA placement of host buffers: allocate on a node (mbind), read back where pages live (move_pages).

CXL memory expanders appear to Linux as CPU-less NUMA nodes, so "put this expert on CXL-B" means "allocate
its host master copy on node N and verify it landed there". Raw syscalls through ctypes (no libnuma
needed). Off Linux, or on an architecture whose syscall numbers we do not know, allocation falls back to a
plain aligned buffer and the node is reported as unknown (-1), never guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Syscall numbers: x86-64 from arch/x86/entry/syscalls/syscall_64.tbl; aarch64 from
# include/uapi/asm-generic/unistd.h (checked against /usr/include/asm-generic/unistd.h).
SYSCALLS = {
    "x86_64": {"mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "move_pages": 279},
    "aarch64": {"mbind": 235, "get_mempolicy": 236, "set_mempolicy": 237, "move_pages": 239},
}
MPOL_DEFAULT = 0
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_MF_MOVE = 2
NODE_UNKNOWN = -1  # node_of_pages() value when this platform cannot tell
NODE_NOT_TOUCHED = -errno.ENOENT  # move_pages status of a page never written (-2)

_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
_NR = SYSCALLS.get(_MACHINE) if sys.platform.startswith("linux") else None
_NODE_DIR = Path("/sys/devices/system/node")


class NumaError(OSError):
    """A NUMA request failed; the message names the node and what is available."""


def supported() -> bool:
    """True when this process can bind and query NUMA placement (Linux on x86-64 or aarch64)."""
    return _NR is not None


def status() -> str:
    """One line saying whether NUMA placement is real here, for logs and metrics."""
    if _NR is None:
        return f"NUMA placement unavailable on {sys.platform}/{platform.machine()}: nodes are unknown"
    return f"NUMA placement via syscalls on {_MACHINE}; memory nodes {memory_nodes()}"


def _parse_list(text: str) -> tuple[int, ...]:
    """Parse a sysfs cpu/node list such as '0-3,8,10-11'."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def memory_nodes() -> tuple[int, ...]:
    """Online NUMA nodes that have memory (where a buffer can be placed)."""
    for name in ("has_memory", "online"):
        p = _NODE_DIR / name
        if p.exists():
            return _parse_list(p.read_text())
    return (0,)


def num_nodes() -> int:
    """Number of NUMA nodes with memory (1 on a machine without NUMA information)."""
    return len(memory_nodes())


_LIBC = None


def _syscall(name: str, *args) -> int:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.syscall.restype = ctypes.c_long
    return _LIBC.syscall(ctypes.c_long(_NR[name]), *args)


def _nodemask(node: int) -> tuple[ctypes.Array, int]:
    """A nodemask bitmap (array of unsigned long) with one bit set, and maxnode for the syscall."""
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = node // bits + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // bits] = 1 << (node % bits)
    return mask, words * bits + 1  # the kernel reads maxnode - 1 bits


def _check_node(node: int) -> None:
    nodes = memory_nodes()
    if not isinstance(node, (int, np.integer)) or node not in nodes:
        raise NumaError(f"NUMA node {node!r} does not exist or has no memory; nodes available: {list(nodes)}")


def aligned_zeros(nbytes: int, align: int = 64) -> np.ndarray:
    """A zeroed uint8 buffer of `nbytes` starting `align`-byte aligned (no NUMA placement). Host arrays
    this aligned enter JAX (pinned_host, or the host kernel's GEMMs) without a copy."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"aligned_zeros: align must be a power of two, got {align}")
    raw = np.zeros(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes]


def alloc_on_node(nbytes: int, node: int, align: int = 64) -> np.ndarray:
    """A zeroed uint8 buffer of `nbytes` whose pages live on NUMA `node`, start aligned to `align`.

    Anonymous private mmap, `mbind(MPOL_BIND, STRICT|MOVE)` before the first touch, then every page is
    written so it is placed now, not at some later first use. 64-byte alignment lets JAX `pinned_host`
    alias the buffer instead of copying it (which would lose the placement).
    """
    if nbytes < 0:
        raise ValueError(f"alloc_on_node: nbytes must be >= 0, got {nbytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alloc_on_node: align must be a power of two, got {align}")
    if _NR is None:
        warnings.warn(status() + "; allocating an unbound buffer", RuntimeWarning, stacklevel=2)
        return aligned_zeros(nbytes, align)
    _check_node(node)
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    page = mmap.PAGESIZE
    extra = 0 if align <= page else align
    length = -(-(nbytes + extra) // page) * page
    buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(buf, np.uint8)  # keeps `buf` alive as long as any view of it
    addr = raw.ctypes.data
    mask, maxnode = _nodemask(int(node))
    rc = _syscall(
        "mbind",
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        ctypes.c_int(MPOL_BIND),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(MPOL_MF_STRICT | MPOL_MF_MOVE),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise NumaError(
            f"mbind({length} bytes, node {node}) failed: {os.strerror(err)}; nodes available: "
            f"{list(memory_nodes())}"
        )
    raw[::page] = 0  # first touch of every page, under the bound policy
    offset = (-addr) % align
    return raw[offset : offset + nbytes]


def node_of_pages(array: np.ndarray) -> np.ndarray:
    """The NUMA node of each page spanned by `array` (int32 [pages]).

    From `move_pages(pid=0, nodes=NULL)`: -2 for a page never touched, other negatives are -errno;
    -1 (NODE_UNKNOWN) everywhere on a platform that cannot tell.
    """
    page = mmap.PAGESIZE
    start = array.ctypes.data // page * page
    end = array.ctypes.data + max(array.nbytes, 1)
    count = -(-(end - start) // page)
    if _NR is None:
        return np.full(count, NODE_UNKNOWN, np.int32)
    pages = (ctypes.c_void_p * count)(*range(start, start + count * page, page))
    out = (ctypes.c_int * count)()
    rc = _syscall(
        "move_pages",
        ctypes.c_int(0),
        ctypes.c_ulong(count),
        pages,
        ctypes.c_void_p(None),
        out,
        ctypes.c_int(0),
    )
    if rc < 0:
        raise NumaError(f"move_pages over {count} pages failed: {os.strerror(ctypes.get_errno())}")
    return np.frombuffer(out, np.int32).copy()


def verify_on_node(array: np.ndarray, node: int) -> int:
    """Check that every page of `array` lives on `node`; return the page count, else raise NumaError."""
    nodes = node_of_pages(array)
    if _NR is None:
        raise NumaError(f"cannot verify placement on node {node}: {status()}")
    wrong = nodes != node
    if wrong.any():
        found, counts = np.unique(nodes[wrong], return_counts=True)
        where = ", ".join(
            f"{c} on {'untouched' if n == NODE_NOT_TOUCHED else f'node {n}'}" for n, c in zip(found, counts)
        )
        raise NumaError(f"{wrong.sum()} of {nodes.size} pages are not on node {node}: {where}")
    return int(nodes.size)


@contextlib.contextmanager
def bound_to_node(node: int) -> Iterator[None]:
    """Bind this thread's allocations to `node` (set_mempolicy MPOL_BIND) inside the block.

    For buffers that another library allocates (e.g. a JAX `pinned_host` array): pages first touched
    inside the block land on `node`. Restores the default policy afterwards.
    """
    if _NR is None:
        warnings.warn(status() + "; not binding", RuntimeWarning, stacklevel=3)
        yield
        return
    _check_node(node)
    mask, maxnode = _nodemask(int(node))
    if _syscall("set_mempolicy", ctypes.c_int(MPOL_BIND), mask, ctypes.c_ulong(maxnode)) != 0:
        raise NumaError(f"set_mempolicy(BIND, node {node}) failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        _syscall("set_mempolicy", ctypes.c_int(MPOL_DEFAULT), ctypes.c_void_p(None), ctypes.c_ulong(0))
