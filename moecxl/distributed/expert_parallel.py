"""Expert parallelism on JAX's own distributed engine: a `(data, expert)` mesh, `shard_map`, all-to-all.

Experts are sharded over the `expert` axis (device j of a data row holds experts [j·E/X, (j+1)·E/X));
tokens (N = B·T, batch-major) are split over all devices, so the `data` axis splits the batch. Each
device sends every (token, k) pair to the device owning its expert (`lax.all_to_all`), runs the
unchanged `moe_ffn` over its local experts, and the results travel back the same way to be combined
with the router weights where the token lives. Nothing is dropped: each send buffer holds every pair
a device has (capacity n·K), so the outputs equal the single-device model up to float rounding.
`dispatch="psum"` is the simpler alternative kept as a cross-check: tokens replicated over `expert`,
each device adds its experts' share, one `psum` (no dispatch, X× the FFN input reads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moecxl.model.experts import moe_ffn
from moecxl.model.moe import ExpertParam

DATA, EXPERT = "data", "expert"
DISPATCHES = ("all_to_all", "psum")


class MeshError(ValueError):
    """A mesh that cannot hold the model (axis missing, experts not divisible); names E and the axis."""


def make_mesh(data: int = 1, expert: int | None = None, devices=None) -> Mesh:
    """A `(data, expert)` mesh over `devices` (all global devices by default); Auto axes (plain `Mesh`)."""
    devs = np.asarray(jax.devices() if devices is None else devices, dtype=object).reshape(-1)
    expert = len(devs) // data if expert is None else expert
    if data < 1 or expert < 1 or data * expert != len(devs):
        raise MeshError(f"mesh data={data} x expert={expert} needs {data * expert} devices, have {len(devs)}")
    return Mesh(devs.reshape(data, expert), (DATA, EXPERT))


def check_mesh(mesh: Mesh, num_experts: int) -> int:
    """Experts per device (E / X); raises `MeshError` when the `expert` axis does not divide E."""
    for ax in (DATA, EXPERT):
        if ax not in mesh.shape:
            raise MeshError(
                f"mesh axes {tuple(mesh.shape)} lack {ax!r}; build it with make_mesh(data, expert)"
            )
    X = mesh.shape[EXPERT]
    if num_experts % X:
        raise MeshError(
            f"num_experts E={num_experts} is not divisible by the mesh's {EXPERT!r} axis size {X}; "
            f"use an expert axis that divides {num_experts}"
        )
    return num_experts // X


# ---- the shard_map bodies -----------------------------------------------------------------------------


def _dispatch_a2a(x_nD, ids_nK, w_nK, ins, out, slot_e, *, E_loc: int, X: int):
    """One device: send pairs to their expert's device, compute there, bring results back, combine."""
    n, K = ids_nK.shape
    D = x_nD.shape[-1]
    M = n * K
    ids_M = ids_nK.reshape(M)
    dest_M = ids_M // E_loc  # owning device on the expert axis
    onehot_MX = dest_M[:, None] == jnp.arange(X)[None, :]
    rank_M = jnp.take_along_axis(jnp.cumsum(onehot_MX, axis=0) - 1, dest_M[:, None], axis=1)[:, 0]
    x_MD = jnp.repeat(x_nD, K, axis=0)  # pair m = (token m // K, choice m % K)
    send_XMD = jnp.zeros((X, M, D), x_nD.dtype).at[dest_M, rank_M].set(x_MD)
    send_id_XM = jnp.zeros((X, M), ids_M.dtype).at[dest_M, rank_M].set(ids_M % E_loc)
    send_ok_XM = jnp.zeros((X, M), x_nD.dtype).at[dest_M, rank_M].set(1)
    recv_XMD = jax.lax.all_to_all(send_XMD, EXPERT, 0, 0)  # [source device, pair, D]
    recv_id_XM = jax.lax.all_to_all(send_id_XM, EXPERT, 0, 0)
    recv_ok_XM = jax.lax.all_to_all(send_ok_XM, EXPERT, 0, 0)
    # Weight 1 per real pair (0 for padding): the router weights are applied back home, as on one device.
    y_RD = moe_ffn(
        recv_XMD.reshape(X * M, D),
        recv_id_XM.reshape(X * M, 1),
        recv_ok_XM.reshape(X * M, 1),
        ins,
        out,
        slot_e,
    )
    back_XMD = jax.lax.all_to_all(y_RD.reshape(X, M, D), EXPERT, 0, 0)  # [dest device, pair, D]
    y_nKD = back_XMD[dest_M, rank_M].reshape(n, K, D)
    return jnp.einsum("nK,nKD->nD", w_nK.astype(y_nKD.dtype), y_nKD)


def _dispatch_psum(x_nD, ids_nK, w_nK, ins, out, slot_e, *, E_loc: int, X: int):
    """One device: its experts' share of every token of its data row, summed over the expert axis."""
    lo = jax.lax.axis_index(EXPERT) * E_loc
    mine_nK = (ids_nK >= lo) & (ids_nK < lo + E_loc)
    local_nK = jnp.where(mine_nK, ids_nK - lo, 0)
    y_nD = moe_ffn(x_nD, local_nK, jnp.where(mine_nK, w_nK, 0).astype(w_nK.dtype), ins, out, slot_e)
    return jax.lax.psum(y_nD, EXPERT)


def local_slot_map(mesh: Mesh, num_experts: int) -> jax.Array:
    """Resident experts: each device's slot map is arange(E/X); global [E], sharded over `expert`."""
    E_loc = check_mesh(mesh, num_experts)
    slot_E = np.tile(np.arange(E_loc, dtype=np.int32), num_experts // E_loc)
    return to_global(slot_E, mesh, P(EXPERT))


def ep_expert_step(
    xn_BTD,
    weights_BTK,
    ids_BTK,
    ins,
    out,
    mesh: Mesh,
    slot_map=None,
    *,
    per_device: bool = False,
    dispatch: str = "all_to_all",
):
    """Expert-parallel `expert_step`: out_BTD = sum_k w·FFN_k(xn), experts sharded over `expert`.

    `ins` ([E, D, F] each) / `out` [E, F, D] are sharded over `expert` with a local slot map `slot_map`
    [E] (default: resident, arange(E/X) per device). `per_device=True`: one slot array and slot map
    per device (an engine's cache each): leading axis (data · expert · C), sharded over both axes.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch {dispatch!r} is not one of {DISPATCHES}")
    B, T, D = xn_BTD.shape
    K = ids_BTK.shape[-1]
    E = _num_experts(out, slot_map, mesh, per_device)
    E_loc = check_mesh(mesh, E)
    X, DP = mesh.shape[EXPERT], mesh.shape[DATA]
    if slot_map is None:
        slot_map = jnp.tile(jnp.arange(E_loc, dtype=jnp.int32), X)
    N = B * T
    tok = (DATA, EXPERT) if dispatch == "all_to_all" else DATA
    n_shards = DP * X if dispatch == "all_to_all" else DP
    pad = -N % n_shards
    x_ND = jnp.pad(xn_BTD.reshape(N, D), ((0, pad), (0, 0)))
    ids_NK = jnp.pad(ids_BTK.reshape(N, K), ((0, pad), (0, 0)))
    w_NK = jnp.pad(weights_BTK.reshape(N, K), ((0, pad), (0, 0)))  # padding rows: expert 0, weight 0
    w_spec = P((DATA, EXPERT)) if per_device else P(EXPERT)
    body = functools.partial(_dispatch_a2a if dispatch == "all_to_all" else _dispatch_psum, E_loc=E_loc, X=X)
    y_ND = jax.shard_map(
        lambda x, i, w, ins_, out_, s: body(x, i, w, tuple(ins_), out_, s),
        mesh=mesh,
        in_specs=(P(tok), P(tok), P(tok), tuple(w_spec for _ in ins), w_spec, w_spec),
        out_specs=P(tok),
    )(x_ND, ids_NK, w_NK, tuple(ins), out, slot_map)
    return y_ND[:N].reshape(B, T, D).astype(xn_BTD.dtype)


def _num_experts(out, slot_map, mesh: Mesh, per_device: bool) -> int:
    if not per_device:
        return out.shape[0]
    return slot_map.shape[0] // mesh.shape[DATA]


# ---- placing arrays on the mesh ------------------------------------------------------------------------


def to_global(x, mesh: Mesh, spec=None) -> jax.Array:
    """A global array on `mesh` (replicated, or `spec`) from a value every process holds in full."""
    spec = P() if spec is None else spec
    x_np = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
    if x_np is None:
        return x
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x_np.shape, sharding, lambda idx: x_np[idx])


def replicate(x, mesh: Mesh) -> jax.Array:
    """A process-local device array -> replicated on `mesh` without a host round trip."""
    local = [d for d in mesh.devices.reshape(-1) if d.process_index == jax.process_index()]
    bufs = [jax.device_put(x, d) for d in local]
    return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(mesh, P()), bufs)


def to_local(x: jax.Array, device=None) -> jax.Array:
    """A replicated global array -> its copy on this process's `device` (the default device)."""
    device = device or jax.local_devices()[0]
    for s in x.addressable_shards:
        if s.device == device:
            return s.data
    return jax.device_put(x.addressable_shards[0].data, device)


def shard_model(model, mesh: Mesh):
    """Shard every `ExpertBank` of `model` over the `expert` axis, in place; other weights stay put.

    Works with several processes: each builds the same model and keeps only its devices' shards.
    """
    check_mesh(mesh, model.cfg.num_experts)
    state = nnx.state(model, ExpertParam)
    sharded = jax.tree.map(lambda a: to_global(a, mesh, P(EXPERT)), state)
    nnx.update(model, sharded)
    return model


# ---- the drop-in for generate -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _ep_step_jit(mesh: Mesh, per_device: bool, dispatch: str):
    def step(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_map):
        y = ep_expert_step(
            xn_BTD, weights_BTK, ids_BTK, ins, out, mesh, slot_map, per_device=per_device, dispatch=dispatch
        )
        return h_BTD + y

    return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


class ExpertParallel:
    """`ExpertProvider` for `generate`: experts sharded over the mesh, the expert step expert-parallel.

    The dense half of each layer runs where `generate` runs it (each process's default device); the
    expert step takes its inputs onto the mesh (replicated), dispatches with all-to-all, and hands
    the result back to the default device. Call `shard_model(model, mesh)` first (done here if not).
    `heartbeat()` is called before each expert step (a `Watchdog.beat`, so a run waiting on a dead
    peer is bounded while a slow but live one is not cut short).
    """

    timing = None

    def __init__(self, model, mesh: Mesh, *, dispatch: str = "all_to_all", heartbeat=None):
        self.heartbeat = heartbeat  # called before each expert step (e.g. `Watchdog.beat`)
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch {dispatch!r} is not one of {DISPATCHES}")
        self.mesh, self.dispatch = mesh, dispatch
        E = model.cfg.num_experts
        check_mesh(mesh, E)
        self._layers = []
        for layer in model.layers:
            if layer.experts is None:
                continue
            ins, out = layer.experts.arrays()
            if not _on_mesh(out, mesh):
                shard_model(model, mesh)
                ins, out = layer.experts.arrays()
            self._layers.append((tuple(ins), out))
        self._slot_map = local_slot_map(mesh, E)
        self._step = _ep_step_jit(mesh, False, dispatch)
        self.calls = 0

    def begin(self, phase: str, step: int) -> None:
        pass

    def end(self, phase: str, step: int) -> None:
        pass

    def experts(self, moe_index: int, core):
        ins, out = self._layers[moe_index]
        return ins, out, self._slot_map

    def experts_fn(self, h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_map):
        """The expert step `generate` calls instead of its single-device one (same arguments)."""
        self.calls += 1
        if self.heartbeat is not None:
            self.heartbeat(f"expert step {self.calls}")
        args = [replicate(a, self.mesh) for a in (h_BTD, xn_BTD, weights_BTK, ids_BTK)]
        return to_local(self._step(*args, ins, out, slot_map))

    def metrics(self) -> dict:
        return {"expert_parallel": dict(self.mesh.shape), "dispatch": self.dispatch}


EPProvider = ExpertParallel


def _on_mesh(x, mesh: Mesh) -> bool:
    s = getattr(x, "sharding", None)
    return isinstance(s, NamedSharding) and s.mesh == mesh and s.spec[:1] == (EXPERT,)


# ---- the full forward, expert-parallel and data-parallel ----------------------------------------------


@functools.lru_cache(maxsize=16)
def _forward_jit(graphdef, mesh: Mesh, dispatch: str):
    from moecxl.model.attention import attention_mask
    from moecxl.model.decoder import MoEOutput, positions_from_mask

    batch = NamedSharding(mesh, P(DATA))

    def forward(state, ids_BT, valid_BT):
        model = nnx.merge(graphdef, state)
        B, T = ids_BT.shape
        pos_BT = positions_from_mask(valid_BT)
        mask_BTS = attention_mask(valid_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), model.cfg.sliding_window)
        x = jax.lax.with_sharding_constraint(model.embed(ids_BT), batch)
        rl, ids, ws, xs = [], [], [], []
        for layer in model.layers:
            co, _ = layer.core(x, pos_BT, mask_BTS)
            if co.ids_BTK is None:
                x = co.h_BTD
                continue
            ins, out = layer.experts.arrays()
            y = ep_expert_step(co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, mesh, dispatch=dispatch)
            x = jax.lax.with_sharding_constraint(co.h_BTD + y, batch)
            rl.append(co.router_logits_BTE)
            ids.append(co.ids_BTK)
            ws.append(co.weights_BTK)
            xs.append(co.xn_BTD)
        return MoEOutput(model.head(x), rl, ids, ws, xs)

    return jax.jit(forward, out_shardings=NamedSharding(mesh, P()))


def ep_forward(model, input_ids_BT, mesh: Mesh, attention_mask_BT=None, *, dispatch: str = "all_to_all"):
    """`model(input_ids)` with the batch over `data` and the experts over `expert` (one SPMD program).

    Returns an `MoEOutput` of replicated global arrays. B must be divisible by the `data` axis size.
    """
    check_mesh(mesh, model.cfg.num_experts)
    ids = np.asarray(input_ids_BT, np.int32)
    B = ids.shape[0]
    if B % mesh.shape[DATA]:
        raise MeshError(f"batch B={B} is not divisible by the mesh's {DATA!r} axis size {mesh.shape[DATA]}")
    valid = np.ones(ids.shape, bool) if attention_mask_BT is None else np.asarray(attention_mask_BT, bool)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a if _on_mesh(a, mesh) else to_global(a, mesh), state)
    return _forward_jit(graphdef, mesh, dispatch)(
        state, to_global(ids, mesh, P(DATA)), to_global(valid, mesh, P(DATA))
    )
