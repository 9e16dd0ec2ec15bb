"""The host expert kernel: one expert's FFN computed where its bytes live, near memory bandwidth.

A missed expert computed on the host (Fiddler, kTransformers, `moecxl_host`) is worth it only if the CPU
streams the expert's stored bytes at close to the memory's read rate. Converting a bf16 expert to a float32
copy per call (numpy) reaches ~6% of it. This kernel reads the stored matrices in place (bf16 as its uint16
bit pattern, int8 with the per-row scales of `store.quantize_int8`, or float32), widens them in registers
(bf16 -> f32 is `u16 << 16`), accumulates in float32 and splits each matrix's rows over the host's cores
(each thread streams whole rows; the partial products are summed).

Three loop nests, chosen by token count N (each stored weight is read from memory once):
  N < 4   four rows streamed whole, widened inside the FMA loop (memory-bound decode);
  N == 4  ROW_BLOCK rows x COL_TILE columns at a time, widened inside a 4-token x 4-row FMA loop;
  N > 4   the same tiles widened once into a float32 scratch tile (L1-sized, never the expert) that
          every group of four tokens reuses (the compute-bound end, batch 32).

Numba (LLVM) compiles the loops on first use per weight dtype (`cache=True` keeps the machine code on
disk) and vectorises the innermost column loop with 512-bit registers where the CPU has them. Why numba:
jitted JAX on the CPU backend reached 0.7-1.3 GB/s on bf16/int8 experts (XLA converts the whole matrix
before its dot), numpy's convert-then-matmul ~2 GB/s; a oneDNN bf16 linear 21 GB/s but needs torch.
`expert_forward` is the entry; `kerneltable.kernel_expert_s` turns a measured rate table
(`moecxl.memory.hostbench`) into the kernel's own seconds for an expert of any size.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from moecxl.memory import hostgemm
from moecxl.memory.kerneltable import HostKernelError, KernelTable, kernel_expert_s  # noqa: F401 (re-exported)
from moecxl.memory.store import ExpertLayout

DIRECT_MAX_TOKENS = 4  # below this many tokens: widen inside the FMA loop (no scratch)
ROW_BLOCK = 8  # weight rows widened per pass of the blocked nest (a multiple of 4)
COL_TILE = 512  # columns per tile: the scratch tile (ROW_BLOCK x 512 floats) and a token quad fit L1
BATCHED_MIN_TOKENS = 16  # from here XLA GEMMs (`memory.hostgemm`): hostbench measured them faster (bf16 55 vs 62 ms at 16, loops faster at 8)
GEMM_MIN_BYTES = (
    8 << 20
)  # and only for experts this large: a GEMM call costs ~1 ms more (measured: 0.8 / 6 MB experts at 16 tokens, loops 0.4 / 2.7 ms, GEMMs 1.4 / 7.8 ms; at 16.5 MB GEMMs 13 vs 17 ms)
PARALLEL_MIN_BYTES = 1 << 20  # smaller matrices: one thread (a hand-off costs ~20-50 us)
ACTS = ("silu", "relu")  # SwiGLU (gate, up, down) or ReLU MLP (in, down)
BF16 = np.dtype(ml_dtypes.bfloat16)
_WEIGHT_DTYPES = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32), "int8": np.dtype(np.int8)}


def supported(dtype) -> bool:
    """Whether the kernel reads experts stored in `dtype` ("bfloat16", "float32", "int8" with scales)."""
    try:
        return np.dtype(dtype).name in _WEIGHT_DTYPES
    except TypeError:
        return False


# ---- the compiled loops ---------------------------------------------------------------------------------
@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret a uint32 as float32 (an LLVM bitcast: free, and it vectorises)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _widen(v):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(_widen, inline="always")
def _widen_impl(v):
    """A stored weight as float32: bf16 bits shifted into the high half; int8 and float32 converted."""
    if v == types.uint16:
        return lambda v: _bits_to_f32(np.uint32(v) << np.uint32(16))
    if v in (types.int8, types.float32):
        return lambda v: np.float32(v)
    return None


@njit(inline="always")
def _four(a, i, j):
    """a[i, j:j+4] as four scalars (the activations of one token for four rows)."""
    return a[i, j], a[i, j + 1], a[i, j + 2], a[i, j + 3]


@njit(inline="always")
def _four_rows(a, i, lo, hi):
    """Rows i..i+3 of `a`, columns lo:hi, as four 1-D views."""
    return a[i, lo:hi], a[i + 1, lo:hi], a[i + 2, lo:hi], a[i + 3, lo:hi]


@intrinsic
def _prefer_512_bit_vectors(typingctx):
    """Mark the calling compiled function `"prefer-vector-width"="512"`: LLVM's tuning for Intel server
    cores otherwise vectorises with 256-bit registers, half of AVX-512's FMA width (measured: the
    blocked nest's FMA loop 52-77 -> 93-105 GFLOP/s on one Xeon core). No effect without AVX-512."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        set.add(attrs, '"prefer-vector-width"="512"')  # llvmlite checks only its named attributes
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath=True, nogil=True, cache=True)
def _rows(x_NR, W_RC, r0, r1, acc_NC, s_BT, xg_NB):
    """acc_NC = x_NR[:, r0:r1] @ W_RC[r0:r1] (float32). s_BT [ROW_BLOCK, COL_TILE] and xg_NB [N, ROW_BLOCK]
    are scratch. Every inner loop runs over a 1-D slice from index 0: numba then drops its negative-index
    checks and LLVM vectorises the loop."""
    _prefer_512_bit_vectors()
    N = x_NR.shape[0]
    C = W_RC.shape[1]
    RB = s_BT.shape[0]
    acc_NC[:, :] = 0.0
    if N < DIRECT_MAX_TOKENS:  # memory-bound: four whole rows streamed, widened in the FMA loop
        r = r0
        while r + 4 <= r1:
            w0, w1, w2, w3 = W_RC[r], W_RC[r + 1], W_RC[r + 2], W_RC[r + 3]
            for n in range(N):
                a = acc_NC[n]
                x0, x1, x2, x3 = _four(x_NR, n, r)
                for c in range(C):
                    a[c] += x0 * _widen(w0[c]) + x1 * _widen(w1[c]) + x2 * _widen(w2[c]) + x3 * _widen(w3[c])
            r += 4
        while r < r1:
            w0 = W_RC[r]
            for n in range(N):
                a = acc_NC[n]
                x0 = x_NR[n, r]
                for c in range(C):
                    a[c] += x0 * _widen(w0[c])
            r += 1
        return
    for rb in range(r0, r1, RB):
        nr = min(RB, r1 - rb)
        for j in range(RB):  # a short last block is padded with zero activations and zero rows
            for n in range(N):
                xg_NB[n, j] = x_NR[n, rb + j] if j < nr else np.float32(0.0)
        for cs in range(0, C, COL_TILE):
            ce = min(C, cs + COL_TILE)
            w = ce - cs
            if N == 4 and nr == RB:  # one token quad: widen inside the FMA loop, no scratch pass
                a0, a1, a2, a3 = _four_rows(acc_NC, 0, cs, ce)
                for j in range(0, RB, 4):
                    w0, w1, w2, w3 = _four_rows(W_RC, rb + j, cs, ce)
                    x00, x01, x02, x03 = _four(xg_NB, 0, j)
                    x10, x11, x12, x13 = _four(xg_NB, 1, j)
                    x20, x21, x22, x23 = _four(xg_NB, 2, j)
                    x30, x31, x32, x33 = _four(xg_NB, 3, j)
                    for c in range(w):
                        v0, v1, v2, v3 = _widen(w0[c]), _widen(w1[c]), _widen(w2[c]), _widen(w3[c])
                        a0[c] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
                        a1[c] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
                        a2[c] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
                        a3[c] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
                continue
            for j in range(RB):  # widen the tile once (L1-resident), reused by every token below
                sj = s_BT[j, :w]
                if j < nr:
                    row = W_RC[rb + j, cs:ce]
                    for c in range(w):
                        sj[c] = _widen(row[c])
                else:
                    sj[:] = 0.0
            n = 0
            while n + 4 <= N:  # 4 tokens x 4 rows per pass: 16 FMAs per 4 accumulator loads
                a0, a1, a2, a3 = _four_rows(acc_NC, n, cs, ce)
                for j in range(0, RB, 4):
                    s0, s1, s2, s3 = _four_rows(s_BT, j, 0, w)
                    x00, x01, x02, x03 = _four(xg_NB, n, j)
                    x10, x11, x12, x13 = _four(xg_NB, n + 1, j)
                    x20, x21, x22, x23 = _four(xg_NB, n + 2, j)
                    x30, x31, x32, x33 = _four(xg_NB, n + 3, j)
                    for c in range(w):
                        v0, v1, v2, v3 = s0[c], s1[c], s2[c], s3[c]
                        a0[c] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
                        a1[c] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
                        a2[c] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
                        a3[c] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
                n += 4
            while n < N:
                a0 = acc_NC[n, cs:ce]
                for j in range(0, RB, 4):
                    s0, s1, s2, s3 = _four_rows(s_BT, j, 0, w)
                    x0, x1, x2, x3 = _four(xg_NB, n, j)
                    for c in range(w):
                        a0[c] += x0 * s0[c] + x1 * s1[c] + x2 * s2[c] + x3 * s3[c]
                n += 1


@njit(fastmath=True, nogil=True, cache=True)
def _chunk(x_NR, W_RC, part_NC, r0, r1):
    """part_NC = x_NR[:, r0:r1] @ W_RC[r0:r1]: one thread's rows, its scratch allocated here."""
    s = np.empty((ROW_BLOCK, COL_TILE), np.float32)
    xg = np.empty((x_NR.shape[0], ROW_BLOCK), np.float32)
    _rows(x_NR, W_RC, r0, r1, part_NC, s, xg)


@functools.cache
def _pool(n_threads: int) -> ThreadPoolExecutor:
    """The kernel's worker threads (process-wide, like a BLAS pool; created on first use)."""
    return ThreadPoolExecutor(n_threads, thread_name_prefix="moecxl-hostkernel")


def n_threads() -> int:
    """Threads the kernel splits a matrix over: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _matmul(x_NR, W_RC, threads: int) -> np.ndarray:
    """x_NR @ W_RC (float32). The rows are split in contiguous runs over `threads` threads (the calling
    thread takes the first), so each thread streams whole rows, and the partial products are summed; a
    matrix under PARALLEL_MIN_BYTES stays on the calling thread."""
    R, C = W_RC.shape
    if threads <= 1 or W_RC.nbytes < PARALLEL_MIN_BYTES:
        out = np.empty((x_NR.shape[0], C), np.float32)
        _chunk(x_NR, W_RC, out, 0, R)
        return out
    per = -(-R // (threads * ROW_BLOCK)) * ROW_BLOCK  # whole row blocks per thread
    bounds = [(r, min(R, r + per)) for r in range(0, R, per)]
    part = np.empty((len(bounds), x_NR.shape[0], C), np.float32)
    futures = [_pool(threads).submit(_chunk, x_NR, W_RC, part[i], *b) for i, b in enumerate(bounds) if i]
    _chunk(x_NR, W_RC, part[0], *bounds[0])
    for f in futures:
        f.result()
    return part.sum(0) if len(bounds) > 1 else part[0]


# ---- the entry ------------------------------------------------------------------------------------------
def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)  # a pinned_host / CPU jax.Array: a view, no copy
    except Exception as e:  # noqa: BLE001 - name what we were given
        raise HostKernelError(f"{what}: cannot read a {type(a).__name__} as a host array ({e})") from e


def _weights(packed, layout: ExpertLayout) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(flat weight array in its kernel dtype, per-row scales or None, dtype name) of a stored expert."""
    scales = None
    if isinstance(packed, tuple):
        if len(packed) != 2:
            raise HostKernelError(
                f"a low-precision expert is a (q int8 [numel], scales float32 [rows]) pair, got {len(packed)} items"
            )
        packed, scales = (_as_numpy(p, "low-precision expert") for p in packed)
    flat = _as_numpy(packed, "expert").reshape(-1)
    name = "bfloat16" if flat.dtype == BF16 else flat.dtype.name
    if name == "uint16" and layout.dtype == "bfloat16":
        name = "bfloat16"  # the bit pattern of a bf16 expert
    if name not in _WEIGHT_DTYPES or (name == "int8") != (scales is not None):
        need = "an int8 expert needs its scales" if name == "int8" else "scales come with int8 weights only"
        raise HostKernelError(
            f"host kernel: expert stored as {flat.dtype} (layout dtype {layout.dtype}) is not supported; "
            f"supported: bfloat16, float32, int8 with per-row scales"
            + ("" if name not in _WEIGHT_DTYPES else f" ({need})")
        )
    if flat.size != layout.numel:
        raise HostKernelError(
            f"host kernel: packed expert has {flat.size} {name} values, layout {layout.shapes} needs {layout.numel}"
        )
    flat = flat.view(_WEIGHT_DTYPES[name])
    if not flat.flags.c_contiguous:
        raise HostKernelError("host kernel: packed expert is not contiguous")
    if scales is not None:
        rows = sum(int(np.prod(s[:-1])) for s in layout.shapes)
        scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
        if scales.size != rows:
            raise HostKernelError(
                f"host kernel: int8 expert has {scales.size} scales, layout {layout.shapes} has {rows} rows"
            )
    # One compiled specialisation per dtype: stored copies are read-only (pinned_host views), so mark all so.
    flat = flat.view()
    flat.flags.writeable = False
    return flat, scales, name


def _matrices(flat, scales, layout):
    """The layout's matrices as [rows, cols] views of `flat`, each with its rows' scales (or None)."""
    out, o, r = [], 0, 0
    for shape, n in zip(layout.shapes, layout.sizes):
        rows = n // shape[-1]
        w = flat[o : o + n].reshape(rows, shape[-1])
        out.append((w, None if scales is None else scales[r : r + rows]))
        o, r = o + n, r + rows
    return out


def _apply(x_NR, w_RC, s_R):
    """x_NR @ diag(s_R) @ w_RC: an int8 row's scale is folded into the activations, not the weights."""
    if s_R is not None:
        x_NR = x_NR * s_R[None, :]
    return _matmul(np.ascontiguousarray(x_NR, np.float32), w_RC, n_threads())


PATHS = ("auto", "loops", "gemm")


def expert_forward(
    x_ND, packed, layout: ExpertLayout, *, act: str | None = None, path: str = "auto"
) -> np.ndarray:
    """One expert's FFN for N tokens on the host: y_ND float32.

    `packed` is the expert as `HostStore.source` returns it: its packed buffer (numpy or pinned_host jax
    array, in the layout's dtype: bfloat16 or float32), or the (q int8, scales float32) pair of a
    low-precision copy. `act`: "silu" (SwiGLU: gate, up, down) or "relu" (in, down); None takes it from
    the layout's matrix count (3 -> silu, 2 -> relu). `path`: "loops" (the compiled row loops),
    "gemm" (XLA GEMMs on the stored bytes, `memory.hostgemm`; an error where they cannot be read in
    place) or "auto": the GEMMs from BATCHED_MIN_TOKENS tokens on experts of GEMM_MIN_BYTES or more,
    where they can be read in place, the loops otherwise.
    """
    if path not in PATHS:
        raise HostKernelError(f"host kernel: path {path!r}; expected one of {PATHS}")
    n_mats = len(layout.shapes)
    act = act or {3: "silu", 2: "relu"}.get(n_mats)
    if act not in ACTS or n_mats != (3 if act == "silu" else 2):
        raise HostKernelError(
            f"host kernel: act {act!r} with {n_mats} matrices {layout.shapes}; expected 'silu' with 3 "
            f"(gate, up, down) or 'relu' with 2 (in, down)"
        )
    x_ND = _as_numpy(x_ND, "activations")
    D = layout.shapes[0][0]
    if x_ND.ndim != 2 or x_ND.shape[1] != D:
        raise HostKernelError(f"host kernel: activations of shape {x_ND.shape}, expected [N, {D}]")
    flat, scales, name = _weights(packed, layout)
    x = np.ascontiguousarray(x_ND, np.float32)
    if x.shape[0] == 0:
        return np.zeros((0, layout.shapes[-1][-1]), np.float32)
    if path == "gemm" or (
        path == "auto" and x.shape[0] >= BATCHED_MIN_TOKENS and flat.nbytes >= GEMM_MIN_BYTES
    ):
        stored = flat.view(BF16) if name == "bfloat16" else flat
        y = hostgemm.ffn(x, _matrices(stored, scales, layout), act)
        if y is not None:
            return y
        if path == "gemm":
            raise HostKernelError(
                "host kernel: path 'gemm' needs each stored matrix contiguous and 64-byte aligned (read in "
                "place, no copy); this expert's are not"
            )
    mats = _matrices(flat, scales, layout)
    if act == "silu":
        g, u = _apply(x, *mats[0]), _apply(x, *mats[1])
        h = g / (1.0 + np.exp(-g)) * u
    else:
        h = np.maximum(_apply(x, *mats[0]), 0.0)
    return _apply(h, *mats[-1])
