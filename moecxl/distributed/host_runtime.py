"""Each host runs its own tier runtime over the experts it owns; metrics roll up into one report.

Ownership: expert shard j (experts [j·E/X, (j+1)·E/X)) lives on the devices of mesh column j; a host
(process) owns every shard that has a device on it, so a data replica on another host owns a copy.
Each host runs one `OffloadEngine` over its owned experts (its cache on the host's first device);
per MoE layer it is asked only for the (token, k) pairs routed to its experts, then the host fans the
needed shards out to its other devices of the mesh and the expert step runs expert-parallel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moecxl.distributed.expert_parallel import (
    DATA,
    EXPERT,
    ExpertParallel,
    MeshError,
    _ep_step_jit,
    check_mesh,
    to_global,
)
from moecxl.model.bank import ModelBank, SubsetBank


def shard_owners(mesh: Mesh) -> dict[int, list[int]]:
    """Expert shard (mesh column) -> the processes holding a device of it."""
    owners: dict[int, set] = {}
    for (_, j), dev in np.ndenumerate(mesh.devices):
        owners.setdefault(j, set()).add(dev.process_index)
    return {j: sorted(p) for j, p in owners.items()}


def owned_experts(mesh: Mesh, num_experts: int, process_index: int | None = None) -> list[int]:
    """Global expert ids this process owns (every shard with a device on it), ascending."""
    E_loc = check_mesh(mesh, num_experts)
    me = jax.process_index() if process_index is None else process_index
    cols = [j for j, procs in shard_owners(mesh).items() if me in procs]
    return [e for j in sorted(cols) for e in range(j * E_loc, (j + 1) * E_loc)]


def owned_rows(a, expert_ids) -> np.ndarray:
    """Rows `expert_ids` of an [E, ...] array (global or local) from this process's shards only."""
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)[np.asarray(expert_ids)]
    rows = {}
    for s in a.addressable_shards:
        start = s.index[0].start or 0
        data = np.asarray(s.data)
        for i in range(data.shape[0]):
            rows.setdefault(start + i, data[i])
    missing = [e for e in expert_ids if e not in rows]
    if missing:
        raise MeshError(f"experts {missing} are not on process {jax.process_index()}'s devices")
    return np.stack([rows[e] for e in expert_ids])


def expert_subset(model, expert_ids) -> SubsetBank:
    """The experts one host owns, as an `ExpertBank` (rows read from this process's shards)."""
    return ModelBank(model).subset(expert_ids, take_rows=owned_rows)


@dataclasses.dataclass
class _Routing:
    """The slice of a layer's `CoreOut` an engine reads: the pairs routed to its host's experts."""

    xn_BTD: object
    ids_BTK: np.ndarray
    weights_BTK: np.ndarray
    h_BTD: object = None
    router_logits_BTE: object = None


@jax.jit
def _gather_slots(arrays, slots_S):
    return tuple(jnp.take(a, slots_S, axis=0) for a in arrays)


class OffloadedExpertParallel(ExpertParallel):
    """Expert parallelism with a tier runtime per host: `OffloadEngine(**engine_kwargs)` over the
    experts this process owns; `metrics()` is this host's, `rollup` joins the hosts'."""

    def __init__(self, model, mesh: Mesh, *, dispatch: str = "all_to_all", heartbeat=None, **engine_kwargs):
        from moecxl.runtime.engine import OffloadEngine

        super().__init__(model, mesh, dispatch=dispatch, heartbeat=heartbeat)
        E = model.cfg.num_experts
        self.E_loc = check_mesh(mesh, E)
        self.owned = owned_experts(mesh, E)
        self.local_of = np.full(E, -1, np.int64)
        self.local_of[self.owned] = np.arange(len(self.owned))
        self.device = jax.local_devices()[0]
        self.engine = OffloadEngine(expert_subset(model, self.owned), device=self.device, **engine_kwargs)
        me = jax.process_index()
        # This host's devices in mesh order, each with the shard (column) it computes.
        self._mine = [(dev, j) for (_, j), dev in np.ndenumerate(mesh.devices) if dev.process_index == me]
        DP, X = mesh.shape[DATA], mesh.shape[EXPERT]
        self._per_dev = NamedSharding(mesh, P((DATA, EXPERT)))
        self._slot_map = to_global(
            np.tile(np.arange(self.E_loc, dtype=np.int32), DP * X), mesh, P((DATA, EXPERT))
        )
        self._step = _ep_step_jit(mesh, True, dispatch)

    def begin(self, phase: str, step: int) -> None:
        self.engine.begin(phase, step)

    def end(self, phase: str, step: int) -> None:
        self.engine.end(phase, step)

    def after_experts(self, moe_index: int) -> None:
        self.engine.after_experts(moe_index)

    def experts(self, moe_index: int, core):
        ids = np.asarray(core.ids_BTK)
        w = np.asarray(core.weights_BTK)
        mine = self.local_of[ids] >= 0
        eng = self.engine
        if mine.any():
            sub = _Routing(core.xn_BTD, self.local_of[ids[mine]][None, :, None], w[mine][None, :, None])
            ins, out, slot_E = eng.experts(moe_index, sub)
        else:
            eng.after_experts(moe_index)  # install what landed; `_cache` holds the stored arrays
            ins, out, slot_E = eng._cache[: eng.n_ins], eng._cache[eng.n_ins], eng.slot_E[moe_index]
        arrays = (*ins, out)
        bufs = [[] for _ in arrays]
        for dev, j in self._mine:
            local = self.local_of[j * self.E_loc : (j + 1) * self.E_loc]
            # Slots of experts not resident (-1) are never read: only padding rows route to them.
            slots = np.maximum(np.asarray(slot_E)[local], 0).astype(np.int32)
            for b, a in zip(bufs, eng.view(_gather_slots(arrays, slots))):
                b.append(jax.device_put(a, dev))
        DP, X = self.mesh.shape[DATA], self.mesh.shape[EXPERT]
        glob = [
            jax.make_array_from_single_device_arrays((DP * X * self.E_loc, *a.shape[1:]), self._per_dev, b)
            for a, b in zip(arrays, bufs)
        ]
        return tuple(glob[:-1]), glob[-1], self._slot_map

    def metrics(self) -> dict:
        return host_metrics(self.engine, devices=[str(d) for d, _ in self._mine], experts=self.owned)

    def close(self) -> None:
        self.engine.close()


def host_metrics(engine, **extra) -> dict:
    """An engine's metrics plus what a roll-up needs: the lookup count and the host's identity."""
    c = engine.c
    m = dict(engine.metrics())
    m["lookups"] = int(sum(c.hits) + sum(c.inflight_hits) + sum(c.misses))
    m["host"] = jax.process_index()
    m.update(extra)
    return m


_SUMMED = (
    "misses",
    "lookups",
    "prefetch_issued",
    "prefetch_used",
    "late_prefetches",
    "wasted_prefetch_bytes",
    "gated_prefetches",
    "evictions",
    "device_budget_bytes",
    "device_slots",
)


def rollup(metrics_list, names=None) -> dict:
    """One report from per-host metrics: sums of counts and bytes, lookup-weighted hit rates, the
    max stall (hosts stall in parallel; the slowest holds the step) and the sum, a per-host breakdown."""
    ms = list(metrics_list)
    if not ms:
        raise ValueError("rollup of no metrics: pass one metrics dict per host")
    names = list(names) if names is not None else [str(m.get("host", i)) for i, m in enumerate(ms)]
    out: dict = {"hosts": len(ms)}
    for k in _SUMMED:
        vals = [m[k] for m in ms if m.get(k) is not None]
        if vals:
            out[k] = sum(vals)
    bytes_by_tier: dict = {}
    for m in ms:
        for t, b in (m.get("bytes_by_tier") or {}).items():
            bytes_by_tier[t] = bytes_by_tier.get(t, 0) + b
    out["bytes_by_tier"] = bytes_by_tier
    out["bytes_total"] = sum(bytes_by_tier.values())
    weights = [_lookups(m) for m in ms]
    if all(w is not None for w in weights) and sum(weights) > 0:
        out["hit_rate"] = sum(m["hit_rate"] * w for m, w in zip(ms, weights)) / sum(weights)
        out["hit_rate_weighting"] = "lookups"
    else:
        out["hit_rate"] = float(np.mean([m["hit_rate"] for m in ms if "hit_rate" in m]))
        out["hit_rate_weighting"] = "equal (lookup counts missing)"
    stalls = [m.get("stall_s", 0.0) for m in ms]
    out["stall_s"] = max(stalls)
    out["stall_s_sum"] = sum(stalls)
    issued, used = out.get("prefetch_issued", 0), out.get("prefetch_used", 0)
    out["prefetch_precision"] = used / issued if issued else None
    timings = sorted({m.get("timing") for m in ms if m.get("timing")})
    out["timing"] = timings[0] if len(timings) == 1 else "mixed: " + ", ".join(timings)
    keep = (
        "hit_rate",
        "lookups",
        "misses",
        "stall_s",
        "bytes_by_tier",
        "device_budget_bytes",
        "devices",
        "experts",
    )
    out["per_host"] = {n: {k: m[k] for k in keep if k in m} for n, m in zip(names, ms)}
    return out


def _lookups(m: dict):
    if m.get("lookups") is not None:
        return m["lookups"]
    if "misses" in m and m.get("hit_rate", 1.0) < 1.0:
        return m["misses"] / (1.0 - m["hit_rate"])
    return None
