"""Expert FFN dispatch: route tokens to K experts, compute, combine.

Expert weights come as stacked slot arrays (`ins`: one or two [C, D, F] arrays, `out`: [C, F, D]) and
`slot_E` says which slot holds each expert. With every expert resident C = E and slot_E = arange(E);
the offload engine passes its device cache instead. The arithmetic depends only on the shapes
(N, K, E, D, F), never on C or on which slot holds what, so an offloaded run is bit-identical to a
resident one. Two static strategies: `unique` (few tokens: each needed expert read once, decode) and
`blocked` (many tokens: rows sorted by expert into blocks of b rows, one weight matrix per block).

Both gather their experts (or blocks) in groups of GATHER_BYTES: a small model's all at once, one batched
FFN; large experts one at a time in a `lax.scan`. Gathering every needed Mixtral-8x7B expert at once held U
whole experts as temporaries, which XLA:CPU widened to float32 (1.4 GB at decode, 5.6 GB at 8 tokens); over
the engine's slots (bf16 kept as uint16 bits, `dtype`) the step now holds one expert as stored, whatever U
(`expert_format.expert_einsum` keeps the dots from widening).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moecxl.model.expert_format import ExpertFormat, legacy_ffn

UNIQUE_MAX_TOKENS = 64  # N at or under this uses the `unique` strategy


def _ffn(x, w_ins, w_out, eq_in: str, eq_out: str, fmt: ExpertFormat | None = None):
    """The format's FFN over gathered arrays; without one, SwiGLU (gate, up) or ReLU (Switch's wi)."""
    if fmt is None:
        return legacy_ffn(x, w_ins, w_out, eq_in, eq_out)
    return fmt.ffn(x, (*w_ins, w_out), eq_in, eq_out)


GATHER_BYTES = 64 << 20  # expert bytes the step gathers at once: every expert of a small model, one Mixtral's


def group_size(n: int, arrays) -> int:
    """Experts (or blocks) per gather: as many of the n as fit in GATHER_BYTES, at least one."""
    per = sum(math.prod(w.shape[1:]) * w.dtype.itemsize for w in arrays)
    return max(1, min(n, GATHER_BYTES // max(per, 1)))


def value_dtypes(arrays, dtype=None) -> list:
    """What each slot array holds: `dtype` where it holds that dtype's bits (the engine keeps bf16 experts
    as uint16), else its own dtype."""
    same = lambda w: dtype is not None and w.dtype.itemsize == jnp.dtype(dtype).itemsize  # noqa: E731
    return [jnp.dtype(dtype) if same(w) else w.dtype for w in arrays]


def _gathered_ffn(x, idx_G, arrays, dtypes, fmt, eq_in, eq_out):
    """The FFN of the G experts at rows idx_G of `arrays` (values or their bits) over x."""
    ws = [w[idx_G] for w in arrays]
    ws = [w if w.dtype == dt else jax.lax.bitcast_convert_type(w, dt) for w, dt in zip(ws, dtypes)]
    return _ffn(x, ws[:-1], ws[-1], eq_in, eq_out, fmt)


def _as_bits(w):
    return jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype == jnp.bfloat16 else w


# XLA:CPU computes a gather or slice of a bf16 array through float32, and inside a loop hoists that widening
# out as a float32 copy of every slot. Slot arrays kept as their bits (the engine's) are gathered as they are
# on every backend; bf16 values (a resident bank) that need the loop take another route on the CPU only:
# their rows' bits gathered once (U experts, decode) or the layer's experts as uint16 (a long prompt).


def _in_groups(xs, idx, arrays, run_group):
    """`run_group(xs_g, idx_g, arrays)` over the n = len(idx) entries in groups of `group_size`: one call,
    no loop, when all fit (the step as one batched FFN), else a `lax.scan`. Results [n, ...]."""
    n = idx.shape[0]
    G = group_size(n, arrays)
    if n == G:
        return run_group(xs, idx, arrays)
    n_groups = -(-n // G)
    pad = n_groups * G - n  # the last group repeats its last entry; those rows are dropped

    def grouped(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
        return a.reshape(n_groups, G, *a.shape[1:])

    xs_g = None if xs is None else grouped(xs)
    idx_g = grouped(idx)

    def scan(ws, ids):
        per_group = (xs_g if xs is not None else ids, ids)
        out = jax.lax.scan(lambda c, t: (c, run_group(t[0], t[1], ws)), None, per_group)[1]
        return out.reshape(n_groups * G, *out.shape[2:])[:n]

    if not any(w.dtype == jnp.bfloat16 for w in arrays):
        return scan(arrays, idx_g)
    return jax.lax.platform_dependent(
        cpu=lambda: _cpu_bf16(xs, idx, idx_g, arrays, scan), default=lambda: scan(arrays, idx_g)
    )


def _cpu_bf16(xs, idx, idx_g, arrays, scan):
    """The scan over bf16 values on XLA:CPU, through their uint16 bits (see above)."""
    if xs is None:  # decode: the n distinct experts' bits gathered once; groups index into them
        n_groups, G = idx_g.shape[:2]
        local = jnp.minimum(jnp.arange(n_groups * G), idx.shape[0] - 1).reshape(n_groups, G)
        return scan([_as_bits(w[idx]) for w in arrays], local)
    return scan([_as_bits(w) for w in arrays], idx_g)


def each_expert(x_ND, slots_U, arrays, dtypes, fmt=None):
    """y_UND: every row of x_ND through each slot of slots_U, `group_size` experts at a time."""

    def run_group(_, idx_G, ws):
        return _gathered_ffn(x_ND, idx_G, ws, dtypes, fmt, "ND,UDF->UNF", "UNF,UFD->UND")

    return _in_groups(None, slots_U, arrays, run_group)


def each_block(x_JbD, slot_J, arrays, dtypes, fmt=None):
    """y_JbD: block j's rows through the expert in slot_J[j], `group_size` blocks at a time."""

    def run_group(x_GbD, idx_G, ws):
        return _gathered_ffn(x_GbD, idx_G, ws, dtypes, fmt, "JbD,JDF->JbF", "JbF,JFD->JbD")

    return _in_groups(x_JbD, slot_J, arrays, run_group)


def _safe_slots(slot_X):
    # A slot of -1 (expert not cached) can only be asked for by padding rows, whose output is
    # discarded; clamp so the gather stays in range.
    return jnp.maximum(slot_X, 0)


def moe_unique(x_ND, ids_NK, weights_NK, ins, out, slot_E, fmt=None, dtype=None):
    """Few tokens: the U = min(E, N·K) distinct experts, each read once, every token through each."""
    y_UND, comb_NU = unique_parts(x_ND, ids_NK, weights_NK, ins, out, slot_E, fmt=fmt, dtype=dtype)
    return unique_combine(y_UND, comb_NU)


def unique_combine(y_UND, comb_NU):
    """`moe_unique`'s last step: each token's weighted sum over the distinct experts."""
    return jnp.einsum("NU,UND->ND", comb_NU, y_UND)


def unique_parts(
    x_ND, ids_NK, weights_NK, ins, out, slot_E, member_E=None, acc_UND=None, fmt=None, dtype=None
):
    """`moe_unique` before its combine: (y_UND every token through each distinct expert, comb_NU).

    Grouped processing (a layer needing more experts than the device holds) computes the experts of
    `member_E` [E] bool only and keeps `acc_UND`'s rows for the others: the groups' rows assembled, the
    one combine is the resident run's, bit for bit."""
    N, K = ids_NK.shape
    E = slot_E.shape[0]
    U = min(E, N * K)
    flat_M = jnp.sort(ids_NK.reshape(-1))
    first_M = jnp.concatenate([jnp.ones((1,), bool), flat_M[1:] != flat_M[:-1]])
    # Distinct ids first (in ascending order), duplicates pushed to the end.
    order = jnp.argsort(~first_M, stable=True)
    uniq_U = flat_M[order][:U]
    valid_U = first_M[order][:U]
    slots_U = _safe_slots(slot_E[uniq_U])
    arrays = (*ins, out)
    y_UND = each_expert(x_ND, slots_U, arrays, value_dtypes(arrays, dtype), fmt)
    if member_E is not None:
        y_UND = jnp.where(member_E[uniq_U][:, None, None], y_UND, 0 if acc_UND is None else acc_UND)
    match_NKU = (ids_NK[:, :, None] == uniq_U[None, None, :]) & valid_U[None, None, :]
    comb_NU = jnp.einsum("NK,NKU->NU", weights_NK.astype(y_UND.dtype), match_NKU.astype(y_UND.dtype))
    return y_UND, comb_NU


def block_rows(M: int, E: int) -> int:
    """Rows per block for `blocked`: about the mean rows per expert, a power of two in [1, 64]."""
    mean = max(1, M // max(1, min(E, M)))
    return int(min(64, 2 ** math.floor(math.log2(mean))))


def moe_blocked(x_ND, ids_NK, weights_NK, ins, out, slot_E, fmt=None, dtype=None):
    """Many tokens: sort (token, k) rows by expert, pad each expert's rows to blocks of b rows."""
    y_NKD = blocked_parts(x_ND, ids_NK, weights_NK, ins, out, slot_E, fmt=fmt, dtype=dtype)
    return blocked_combine(y_NKD, weights_NK)


def blocked_combine(y_NKD, weights_NK):
    """`moe_blocked`'s last step: each token's weighted sum over its K experts' outputs."""
    return jnp.einsum("NK,NKD->ND", weights_NK.astype(y_NKD.dtype), y_NKD)


def blocked_parts(
    x_ND, ids_NK, weights_NK, ins, out, slot_E, member_E=None, acc_NKD=None, fmt=None, dtype=None
):
    """`moe_blocked` before its combine: y_NKD, each (token, k) row through its expert. With `member_E`
    the rows of the other experts are `acc_NKD`'s (grouped processing, as `unique_parts`)."""
    N, K = ids_NK.shape
    D = x_ND.shape[-1]
    E = slot_E.shape[0]
    M = N * K
    b = block_rows(M, E)
    n_blocks = -(-M // b) + min(E, M)  # every non-empty expert adds at most one partial block
    flat_M = ids_NK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    sorted_M = flat_M[order_M]
    counts_E = jnp.bincount(flat_M, length=E)
    padded_E = -(-counts_E // b) * b
    start_E = jnp.cumsum(counts_E) - counts_E
    pstart_E = jnp.cumsum(padded_E) - padded_E
    dest_M = pstart_E[sorted_M] + jnp.arange(M) - start_E[sorted_M]
    rows = n_blocks * b
    x_rows = jnp.zeros((rows, D), x_ND.dtype).at[dest_M].set(x_ND[order_M // K])
    block_start = jnp.arange(n_blocks) * b
    block_expert = jnp.searchsorted(jnp.cumsum(padded_E), block_start, side="right")
    block_slot = _safe_slots(slot_E[jnp.minimum(block_expert, E - 1)])
    arrays = (*ins, out)
    y_JbD = each_block(x_rows.reshape(n_blocks, b, D), block_slot, arrays, value_dtypes(arrays, dtype), fmt)
    y_sorted_MD = y_JbD.reshape(rows, D)[dest_M]
    y_NKD = jnp.zeros((M, D), y_JbD.dtype).at[order_M].set(y_sorted_MD).reshape(N, K, D)
    if member_E is not None:
        y_NKD = jnp.where(member_E[ids_NK][:, :, None], y_NKD, 0 if acc_NKD is None else acc_NKD)
    return y_NKD


def moe_ffn(x_ND, ids_NK, weights_NK, ins, out, slot_E=None, fmt: ExpertFormat | None = None, dtype=None):
    """Weighted sum over each token's K experts: sum_k w[n,k] · FFN_{ids[n,k]}(x[n]).

    `ins`/`out` are slot arrays (a format's arrays in order, the last one `out`) and `slot_E` maps
    expert id -> slot (identity when omitted). `fmt` None: SwiGLU or ReLU by the count of `ins`.
    `dtype`: the experts' dtype when the arrays hold its bits (the engine's uint16 slots of bf16 experts).
    """
    if fmt is not None and fmt.legacy:
        fmt = None  # the same arithmetic, one compiled step for both spellings
    if slot_E is None:
        slot_E = jnp.arange(out.shape[0], dtype=jnp.int32)
    if x_ND.shape[0] <= UNIQUE_MAX_TOKENS:
        return moe_unique(x_ND, ids_NK, weights_NK, tuple(ins), out, slot_E, fmt, dtype)
    return moe_blocked(x_ND, ids_NK, weights_NK, tuple(ins), out, slot_E, fmt, dtype)


def moe_group(x_ND, ids_NK, weights_NK, ins, out, slot_E, member_E, acc, last: bool, fmt=None, dtype=None):
    """One group of a layer processed in groups: the experts of `member_E` (resident in `slot_E`) computed
    into `acc` (None for the first group; the other groups' rows kept). Returns the new `acc`, or, for the `last`
    group, the layer's output: the same combine over the same per-expert rows as `moe_ffn`, bit for bit."""
    if x_ND.shape[0] <= UNIQUE_MAX_TOKENS:
        y_UND, comb_NU = unique_parts(
            x_ND, ids_NK, weights_NK, tuple(ins), out, slot_E, member_E, acc, fmt, dtype
        )
        return unique_combine(y_UND, comb_NU) if last else y_UND
    y_NKD = blocked_parts(x_ND, ids_NK, weights_NK, tuple(ins), out, slot_E, member_E, acc, fmt, dtype)
    return blocked_combine(y_NKD, weights_NK) if last else y_NKD
