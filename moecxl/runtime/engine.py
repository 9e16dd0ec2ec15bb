"""OffloadEngine: the per-layer loop that keeps the experts a layer needs on the device.

It is an `ExpertProvider` for `generate`: for each MoE layer it reads the top-k ids (the one host
sync per layer), waits for copies in flight, fetches misses from their home tiers, installs them in
a fixed-size device cache, then lets the policy issue prefetches for the layers ahead. The device
cache is C slot arrays of the expert shape; the expert step reads them through a slot map, so the
arithmetic never depends on where an expert was (bit-identical to the resident path).
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moecxl.memory.store import ExpertLayout, HostStore, layout_of
from moecxl.memory.tiers import Hardware, copy_time_s
from moecxl.memory.transfer import TransferEngine, TransferError, dequantize_int8
from moecxl.runtime import placement as placement_mod
from moecxl.runtime import striping
from moecxl.runtime.gate import (
    MissCosts,
    ReuseCalibration,
    copy_alone_s,
    copy_for_later,
    credit_of_reuses,
    demand_pressure,
    expected_reuses,
    host_compute_on_tier_s,
    miss_decision,
    prefetch_gate,
)
from moecxl.runtime.policies import (
    EntryStats,
    NextUse,
    PolicySpec,
    Reuse,
    choose_victims,
    eam_probs,
    eviction_score,
    expected_reuse_distance,
    get_policy,
    pregate_probs,
    reuse_distance_S,
    topk_candidates,
)

DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "cpu-local.yaml"


def _ema(old: float, new: float, alpha: float = 0.1) -> float:
    return (1.0 - alpha) * old + alpha * new


class EngineError(ValueError):
    """Bad engine configuration (budget, policy, profile); the message names the value at fault."""


def storage_dtype(dtype) -> np.dtype:
    """The slot arrays' dtype for experts of `dtype`: 16-bit floats are kept as their uint16 bit patterns.
    XLA:CPU rewrites a whole bf16 array on each in-place slot update (~0.4 ms for a small cache, growing
    with its size) but updates uint16 in place; the bitcasts back are exact and free inside the step."""
    dt = np.dtype(dtype)
    return np.dtype(np.uint16) if jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2 else dt


def _stored(x, stored_dtype, compute_dtype):
    """`x` as the slot arrays store it (see `storage_dtype`)."""
    if x.dtype == stored_dtype:
        return x
    if stored_dtype == np.uint16 and np.dtype(compute_dtype) != np.uint16:
        return jax.lax.bitcast_convert_type(x.astype(compute_dtype), jnp.uint16)
    return x.astype(stored_dtype)


def _computed(a, compute_dtype):
    """A slot array read back in the experts' dtype (a bitcast of the stored bits)."""
    return a if a.dtype == compute_dtype else jax.lax.bitcast_convert_type(a, compute_dtype)


def _write_slot(arrays, packed_P, slot, layout: ExpertLayout):
    mats = layout.unpack(packed_P)
    return tuple(
        jax.lax.dynamic_update_slice(a, _stored(m[None], a.dtype, layout.np_dtype), (slot,) + (0,) * m.ndim)
        for a, m in zip(arrays, mats)
    )


@functools.partial(jax.jit, static_argnames=("dtype",))
def _stored_step_jit(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, dtype):
    """`generate`'s expert step over the engine's stored slot arrays (bit-identical: only bitcasts)."""
    from moecxl.model.moe import expert_step

    ins = tuple(_computed(w, dtype) for w in ins)
    return h_BTD + expert_step(xn_BTD, weights_BTK, ids_BTK, ins, _computed(out, dtype), slot_E)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _view_jit(arrays, dtype):
    return tuple(_computed(a, dtype) for a in arrays)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _install(arrays, packed_GP, slots_G, layout: ExpertLayout):
    """Write G landed experts into their slots, in order: one dispatch per layer, not one per copy.
    G is fixed per engine (its staging size); a short group repeats its last pair (same bytes again)."""
    for g, packed_P in enumerate(packed_GP):
        arrays = _write_slot(arrays, packed_P, slots_G[g], layout)
    return arrays


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _install_int8(arrays, q_and_s, slot, layout: ExpertLayout):
    return _write_slot(arrays, dequantize_int8(q_and_s[0], q_and_s[1], layout), slot, layout)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _mixed_jit(h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra_BTD, dtype):
    from moecxl.model.moe import expert_step

    ins, out = tuple(_computed(w, dtype) for w in ins), _computed(out, dtype)
    on_device = (slot_E[ids_BTK] >= 0).astype(weights_BTK.dtype)
    return h_BTD + expert_step(xn_BTD, weights_BTK * on_device, ids_BTK, ins, out, slot_E) + extra_BTD


@jax.jit
def _router_scores(xn_BTD, routers_HDE):
    return jnp.einsum("BTD,HDE->HBTE", xn_BTD.astype(jnp.float32), routers_HDE.astype(jnp.float32))


class OffloadEngine:
    """Experts in host tiers, a device cache of `device_budget`, and a policy deciding what moves.

    `device_budget`: a fraction of all expert bytes (0 < f <= 1) or a byte count (> 1). Copies in
    flight count against the budget (`max_inflight` staging buffers), so device-resident expert bytes
    never exceed it. `emulate`: delay each copy to what the hardware profile predicts, time-scaled so
    that copy time over measured layer compute equals the target's (`time_scale`; see
    `calibrate_time_scale`); with `emulate=False` copies take the time they take here.
    """

    def __init__(
        self,
        model,
        hardware: Hardware | str | os.PathLike | None = None,
        policy: str | PolicySpec = "lru",
        device_budget: float = 0.25,
        *,
        predictor=None,
        emulate: bool | None = None,
        time_scale: float | None = None,
        target_model=None,
        max_inflight: int | None = None,
        placement: dict | None = None,
        trace=None,
        frequencies=None,
        eam_library=None,
        nvme_dir=None,
        record_events: bool = False,
        rebalance_every: int = 0,
        ema_alpha: float = 0.2,
        replicate_hot: int = 0,
        warm_start: bool = False,
        quality_budget: float = 0.0,
        lowp_threshold: float = 0.3,
        device=None,
    ):
        self.model = model
        self.cfg = model.cfg
        # A name, or a PolicySpec (an ablation such as moecxl without its gate).
        self.policy = policy if isinstance(policy, PolicySpec) else get_policy(policy)
        if isinstance(hardware, (str, os.PathLike)):
            hardware = Hardware.from_yaml(hardware)
        self.hardware = hardware if hardware is not None else Hardware.from_yaml(DEFAULT_PROFILE)
        self.layout = layout_of(model)
        self.expert_bytes = self.layout.nbytes
        self.moe_layers = [
            i for i, layer in enumerate(model.layers) if getattr(layer, "experts", None) is not None
        ]
        self.L, self.E, self.K = len(self.moe_layers), self.cfg.num_experts, self.cfg.top_k
        total = self.L * self.E * self.expert_bytes
        if device_budget is None or device_budget <= 0:
            raise EngineError(
                f"device_budget must be a positive fraction or byte count, got {device_budget!r}"
            )
        budget_bytes = int(device_budget * total) if device_budget <= 1 else int(device_budget)
        self.max_inflight = int(max_inflight if max_inflight is not None else max(2, self.K))
        self.budget_bytes = budget_bytes
        self.n_slots = budget_bytes // self.expert_bytes - self.max_inflight
        min_slots = self.K  # batch 1 decode; larger steps are checked when they come
        if self.n_slots < min_slots:
            need = (min_slots + self.max_inflight) * self.expert_bytes
            raise EngineError(
                f"device_budget {device_budget!r} = {budget_bytes} bytes holds {budget_bytes // self.expert_bytes} "
                f"experts of {self.expert_bytes} bytes; one layer's top-{self.K} plus {self.max_inflight} copies in "
                f"flight need at least {need} bytes ({need / total:.3f} of expert bytes)"
            )
        self.trace = _future_from(trace, self.L) if trace is not None else None
        self._belady = NextUse(self.trace, 4 * self.L) if self.trace is not None else None
        self._reuse = Reuse(self.L, self.E) if self.policy.evict == "predicted" else None
        self._host_s_memo: dict = {}  # (tier, tokens, time scale) -> emulated host seconds
        self._copy_s_memo: dict = {}  # (tier, time scale) -> emulated copy seconds
        self._calibration = ReuseCalibration()  # promised vs served reuses of copies fetched on a miss
        if self.policy.prefetch == "oracle" and self.trace is None:
            raise EngineError("policy 'oracle' needs trace= (the routing it will see, e.g. a resident run)")
        if isinstance(predictor, (str, os.PathLike)):
            from predictor.live import LivePredictor

            predictor = LivePredictor.load(predictor)
        if predictor is not None:
            if hasattr(predictor, "check"):
                predictor.check(self.cfg)  # a predictor trained for another L/E/K is refused
            if self.policy.prefetch not in (None, "oracle"):
                self.policy = replace(self.policy, prefetch="predictor")
        self.predictor = predictor
        self.predictor_name = (
            f"learned ({getattr(predictor, 'path', type(predictor).__name__)})"
            if predictor is not None
            else ("pregate" if self.policy.prefetch == "pregate" else self.policy.prefetch)
        )
        # Host store: home tier of every expert (placement), masters packed in their tiers.
        freq = np.asarray(frequencies, float) if frequencies is not None else None
        self.target_model = target_model or self.cfg
        # A policy that may compute misses where they live homes experts where the host reads fastest.
        self._reader = "cpu" if self.policy.host_compute else "gpu"
        self.placement = placement or placement_mod.initial_placement(
            self.hardware,
            self.L,
            self.E,
            self.store_bytes_per_expert(),
            freq,
            self.target_model.expert_bytes,
            reader=self._reader,
        )
        self.store = HostStore(
            model,
            self.hardware,
            self.placement,
            nvme_dir=nvme_dir,
            low_precision=self.policy.low_precision_on_miss,
        )
        # Emulated link timing.
        if emulate is None:
            emulate = not _is_local(self.hardware)
        self.emulate = emulate
        self.time_scale = (
            time_scale
            if time_scale is not None
            else (calibrate_time_scale(model, self.hardware, self.target_model) if emulate else 1.0)
        )
        self.transfers = TransferEngine(
            self.store, self.hardware, emulate=emulate, time_scale=self.time_scale
        )
        self.emulated_expert_bytes = self.target_model.expert_bytes if emulate else self.expert_bytes
        self.transfers.emulated_bytes = self.emulated_expert_bytes
        if device is not None:  # a host's engine in a multi-device run: copies land on this device
            self.transfers.device_sharding = jax.sharding.SingleDeviceSharding(device)
        # Device cache: fixed slot arrays, committed where the copies land (as those are: mixing committed
        # and uncommitted arguments costs each install a second executable and the slow dispatch path).
        self.compute_dtype = np.dtype(self.layout.np_dtype)
        dev_dtype = storage_dtype(self.compute_dtype)
        self._cache = tuple(
            jnp.zeros((self.n_slots, *s), dev_dtype, device=self.transfers.device_sharding)
            for s in self.layout.shapes
        )
        # Landed copies not yet written into the slot arrays: (value, slot), installed in one jitted
        # call per layer (`_flush`). They still occupy staging, so they count against the budget.
        self._landed: list = []
        self._wait_s = 0.0  # time blocked on copies in flight (stall), accumulated by `_complete`
        self._install_wait_s = 0.0  # time an install waited for expert steps still reading the slots
        # Measured here, per expert (EMAs): issuing a fetch, installing a copy, and host compute beyond
        # the emulated figure. The miss decision adds them to the modelled times.
        self._local_fetch_s = self._local_install_s = self._local_host_s = 0.0
        self._last_step = None  # the last expert step's output (what an install must wait for)
        self._inline_installs = jax.default_backend() == "cpu"
        self.n_ins = len(self.layout.shapes) - 1
        self.slot_key: list = [None] * self.n_slots
        self.slot_of: dict = {}
        # The same map as arrays, for the vectorised victim scan: layer and expert per slot (-1: free) and
        # when it was cached (the order `slot_of` iterates in, which breaks ties as the simulator does).
        self._slot_layer_S = np.full(self.n_slots, -1, np.int64)
        self._slot_expert_S = np.full(self.n_slots, -1, np.int64)
        self._slot_seq_S = np.zeros(self.n_slots, np.int64)
        self._seq = 0
        self.slot_E = [np.full(self.E, -1, np.int32) for _ in range(self.L)]
        self.stats: dict = {}
        self.lowp: set = set()
        self.inflight: dict = {}  # key -> (Transfer, slot, prefetched)
        self.free_slots = list(range(self.n_slots))[::-1]
        self.tick = 0
        self.phase, self.step = "prefill", 0
        self.record_events = record_events
        self.events: list[dict] = []
        self.lowp_threshold = lowp_threshold
        self.offline: set[str] = set()
        # Pre-gate: each layer's next `horizon` routers, stacked and sliced once on the device.
        self._routers_ahead, self._scores = None, None
        if self.policy.prefetch == "pregate":
            routers = jnp.stack([model.layers[i].core.router_DE[...] for i in self.moe_layers])
            H = self.policy.horizon
            self._routers_ahead = [routers[m + 1 : m + 1 + H] for m in range(self.L)]
        self._eam_library = list(eam_library or [])
        self._eam_current = np.zeros((self.L, self.E))
        self._pos = 0  # index into trace visits (oracle)
        self.c = _Counters(self.L)
        # Measured compute per layer visit, by phase (an EMA of the time between visits less stalls).
        self._layer_s: dict = {}
        self._prev_visit = None  # (entry time, stall, phase) of the last visit
        # Paper mechanisms: EMA activation frequencies, migration, replication, faults.
        self.original_home = dict(self.store.home_of)
        self.rebalance_every = int(rebalance_every)
        self.ema_alpha = float(ema_alpha)
        self.freq_ema = np.zeros((self.L, self.E)) if freq is None else freq / max(1e-12, freq.sum()) * self.L
        self._step_counts_py = [[0] * self.E for _ in range(self.L)]  # this step's visits per (layer, expert)
        self.replicate_hot = int(replicate_hot)
        self.stripe_min_gain = striping.MIN_GAIN  # a striped read must land this much sooner (see `stripe`)
        self.stripe_report: dict = {"striped": 0, "skipped": {}}
        self.faults = tuple(getattr(self.hardware, "faults", ()) or ())
        self.timeline: list[dict] = []  # per decode step: bytes and busy time per tier (utilisation)
        # The three-way miss decision (policy moecxl_nd): fetch, host compute, or low precision.
        if not 0.0 <= quality_budget <= 1.0:
            raise EngineError(
                f"quality_budget must be in [0, 1] (fraction of misses served in int8), got {quality_budget!r}"
            )
        self.quality_budget = float(quality_budget)
        self._host_keys: list = []
        self._host_in = None  # (activations, weights, output) on the host during a visit
        self._extra = None
        if self.policy.host_compute and self.hardware.host is None:
            raise EngineError(
                f"policy {self.policy.name!r} computes misses on the host, but profile {self.hardware.name!r} "
                "has no `host:` block (gflops, mem_gbps with sources); add one, or measure this machine's "
                "with moecxl.memory.measure_host_matmul_tflops / measure_host_memcpy_gbps"
            )
        if warm_start:
            self._warm_start()

    # ---- helpers -------------------------------------------------------------------------------------
    def store_bytes_per_expert(self) -> int:
        return self.layout.slot_bytes

    def _event(self, kind: str, **kw):
        if self.record_events:
            self.events.append(
                {
                    "t_s": self.transfers.now_s(),
                    "kind": kind,
                    "phase": self.phase,
                    "step": self.step,
                    **kw,
                    "device_expert_bytes": self.device_expert_bytes(),
                }
            )

    def device_expert_bytes(self) -> int:
        """Expert bytes the engine holds on the device now: the slot arrays plus copies in flight or
        landed and not yet installed (both in staging)."""
        return (self.n_slots + len(self.inflight) + len(self._landed)) * self.expert_bytes

    @property
    def cache(self) -> tuple:
        """The slot arrays (ins..., out) with every landed copy installed, in the experts' dtype."""
        if self._landed:
            self._flush()
        return self.view(self._cache)

    # ---- the provider protocol -----------------------------------------------------------------------
    def begin(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step
        if phase == "prefill":
            self._eam_current[:] = 0
        if phase == "decode":
            for f in self.faults:  # scheduled faults from the hardware profile, by decode step
                if f.offline_at_step == step and f.tier not in self.offline:
                    self.set_offline(f.tier)
                if f.online_at_step is not None and f.online_at_step == step and f.tier in self.offline:
                    self.set_online(f.tier)

    def end(self, phase: str, step: int) -> None:
        if self._after is not None or self._landed:
            self.after_experts(-1)
        a = self.ema_alpha
        self.freq_ema = (1 - a) * self.freq_ema + a * np.asarray(self._step_counts_py, float)
        self._step_counts_py = [[0] * self.E for _ in range(self.L)]
        clock = self.transfers.clock
        self.timeline.append(
            {
                "phase": phase,
                "step": step,
                "t_s": self.transfers.now_s(),
                "bytes_by_tier": dict(clock.bytes_by_tier),
                "busy_s_by_tier": dict(clock.busy_s_by_tier),
            }
        )
        if phase == "decode" and self.rebalance_every and step % self.rebalance_every == 0:
            self.rebalance()

    _after = None  # (layer, core output, protected keys): the prefetch `after_experts` owes

    def after_experts(self, m: int) -> None:
        """Called once layer `m`'s expert step is dispatched: installs of landed copies this layer did not
        read and the policy's prefetch for the layers ahead, off the critical path (their time is kept
        apart, as `control_after_samples_us`)."""
        args, self._after = self._after, None
        if args is None and not self._landed:
            return
        t0, install_wait_s0 = time.perf_counter(), self._install_wait_s
        if args is not None:
            self._prefetch(*args)
        if self._landed:
            self._flush()
        if self.phase == "decode" and len(self.c.control_after_samples_us) < 100_000:
            busy = time.perf_counter() - t0 - (self._install_wait_s - install_wait_s0)
            self.c.control_after_samples_us.append(busy * 1e6)

    def experts(self, m: int, co):
        # Control-plane time: all of this call but the host sync (it waits for the layer's compute) and
        # the stall (blocked on copies in flight, or computing experts on the host).
        if self._after is not None or self._landed:  # a caller that skips `after_experts`: do it now
            self.after_experts(m)
        t_enter = time.perf_counter()
        prev = self._prev_visit
        if prev is not None and m > 0 and prev[2] == self.phase:  # the gate's layer time, within a step
            dt = max(0.0, t_enter - prev[0] - prev[1])
            old = self._layer_s.get(self.phase)
            self._layer_s[self.phase] = dt if old is None else 0.8 * old + 0.2 * dt
        self.tick += 1
        if self._routers_ahead is not None and m + 1 < self.L:
            # Pre-gate: later routers on this layer's input, read back with the ids (one sync, not two).
            scores = _router_scores(co.xn_BTD, self._routers_ahead[m])
            t_sync = time.perf_counter()
            ids, self._scores = jax.device_get((co.ids_BTK, scores))
        else:
            t_sync = time.perf_counter()
            ids = np.asarray(co.ids_BTK)  # the one host sync per MoE layer (waits for the layer's compute)
        sync_s = time.perf_counter() - t_sync
        wait_s0, install_wait_s0 = self._wait_s, self._install_wait_s
        # Plain Python on a few dozen ints beats numpy's per-call overhead on the hot path.
        flat = ids.ravel().tolist()
        needed = sorted(set(flat))
        if len(needed) > self.n_slots:
            need = (len(needed) + self.max_inflight) * self.expert_bytes
            raise EngineError(
                f"layer {m} needs {len(needed)} distinct experts at once ({ids.shape[0]}x{ids.shape[1]} tokens, "
                f"top-{self.K}) but the device cache holds {self.n_slots}; use a device_budget of at least "
                f"{need} bytes, or a smaller batch or prompt"
            )
        keys = [(m, e) for e in needed]
        if self._reuse is not None:
            self._reuse.observe(m, needed)
        counts_m = self._step_counts_py[m]
        for e in needed:
            counts_m[e] += 1
        if self.policy.prefetch == "eam":
            self._eam_current[m, needed] += np.bincount(ids.reshape(-1), minlength=self.E)[needed]
        lowp_ok = set()
        if self.policy.low_precision_on_miss:
            w = np.asarray(co.weights_BTK)
            for e in needed:
                if float(w[ids == e].max()) < self.lowp_threshold:
                    lowp_ok.add((m, int(e)))
        if self.inflight:
            self._poll()
        protect = set(keys)
        wait = []
        c, slot_of, lowp, rec = self.c, self.slot_of, self.lowp, self.record_events
        misses_before, host_before = c.misses[m], c.miss_choices["host"]
        host_queue_s = host_wall_s = 0.0
        later = []  # host-computed misses to copy in the background afterwards
        host_done = 0  # self._host_keys[:host_done] are computed
        for key in keys:
            if key in slot_of and (not lowp or key not in lowp or key in lowp_ok):
                c.hits[m] += 1
                st = self.stats[key]
                if st[3] and st[1] == 0:
                    c.prefetch_used += 1
                if rec:
                    self._event("hit", layer=m, expert=key[1])
            elif key in self.inflight:
                c.inflight_hits[m] += 1
                tr, slot, pref = self.inflight[key]
                if pref:
                    c.prefetch_used += 1  # used, if late: it lands before a demand fetch would
                    if not tr.done():
                        c.late_prefetch += 1
                    self.inflight[key] = (tr, slot, False)  # counted: not again when it lands unused
                if self.policy.host_compute:
                    choice, host_s = self._inflight_choice(key, flat.count(key[1]), host_queue_s)
                    if choice == "host":  # the copy still lands, for later uses
                        c.inflight_host += 1
                        host_queue_s += host_s
                        self._host_keys.append(key)
                        protect.discard(key)
                        continue
                wait.append(key)
            else:
                c.misses[m] += 1
                if key in self.slot_of:  # a low-precision copy where an exact one is wanted
                    self._evict(key)
                if self.policy.host_compute:
                    n_tok = flat.count(key[1])
                    choice, host_s = self._miss_choice(key, n_tok, host_queue_s, protect)
                    self.c.miss_choices[choice] += 1
                    if choice == "host":
                        host_queue_s += host_s
                        self._host_keys.append(key)
                        protect.discard(key)
                        if self._copy_for_later(key, n_tok, protect):
                            later.append(key)
                        continue
                    if choice == "lowp":
                        lowp_ok.add(key)
                if len(self.inflight) >= self.max_inflight:
                    # Staging is full: the CPU first computes the host experts chosen so far (the copies
                    # keep landing meanwhile), then a copy lands.
                    if len(self._host_keys) > host_done:
                        t0 = time.perf_counter()
                        self._host_compute(m, co, ids, self._host_keys[host_done:])
                        host_wall_s += time.perf_counter() - t0
                        host_done, host_queue_s = len(self._host_keys), 0.0
                    done = next((k for k in wait if k in self.inflight), next(iter(self.inflight)))
                    self._complete(done)
                self._fetch(key, protect, prefetched=False, low_precision=key in lowp_ok)
                wait.append(key)
        if len(self._host_keys) > host_done:  # the CPU computes while the copies are on the links
            t0 = time.perf_counter()
            self._host_compute(m, co, ids, self._host_keys[host_done:])
            host_wall_s += time.perf_counter() - t0
        self._host_in = None
        for key in later:  # host-computed experts worth caching: copied for later tokens, not waited for
            if len(self.inflight) >= self.max_inflight:
                break
            self.c.copied_for_later += 1
            self._fetch(key, protect, prefetched=True)
        for key in wait:
            if key in self.inflight:
                self._complete(key)
        stall = self._wait_s - wait_s0 + host_wall_s
        c.stall_s += stall
        c.stall_by_layer[m] += stall
        if self.policy.gate:
            self._prev_visit = (t_enter, stall, self.phase)
        if self._reuse is not None:
            # cache turnover: copies installed, not misses (a host-computed miss replaces no slot)
            self._reuse.end_visit(c.misses[m] - misses_before - (c.miss_choices["host"] - host_before))
        stats, tick = self.stats, self.tick
        for key in keys:
            st = stats.get(key)
            if st is not None:  # None: computed on the host, never cached
                st[0] = tick
                st[1] += 1
        if self._landed:  # one install, now if this layer reads a landed copy, else after its dispatch
            pending = {slot for _, slot in self._landed}
            if any(slot_of.get(k) in pending for k in keys):
                self._flush()
        if self.policy.prefetch is not None:
            # Prefetch decisions wait for `after_experts`, once the caller has dispatched this layer's
            # expert step: they then overlap the device's compute instead of delaying its launch.
            self._after = (m, co, protect)
        slot_E = self.slot_E[m]
        if self._after is not None or self._host_keys:
            slot_E = slot_E.copy()  # a snapshot: prefetch may evict other experts of this layer
            for key in self._host_keys:
                slot_E[key[1]] = -1
            self._host_keys = []
        cache = self._cache  # landed copies not installed yet are for other layers (`after_experts`)
        control = time.perf_counter() - t_enter - sync_s - stall - (self._install_wait_s - install_wait_s0)
        c.control_s += control
        if self.phase == "decode" and len(c.control_samples_us) < 100_000:
            c.control_samples_us.append(control * 1e6)
        return cache[: self.n_ins], cache[self.n_ins], slot_E

    # ---- the three-way miss decision --------------------------------------------------------------------
    def _host_compute_s(self, key, n_tokens: int) -> float:
        """Emulated seconds of the host computing one expert where it lives (`gate.host_compute_s`);
        a function of the tier and the token count only, so remembered (the hot path asks per miss)."""
        tier = self._source(key)
        memo = self._host_s_memo.get((tier, n_tokens, self.time_scale))
        if memo is None:
            tgt = self.target_model
            memo = self.time_scale * host_compute_on_tier_s(
                self.hardware,
                tier,
                n_tokens,
                tgt.expert_params,
                self.emulated_expert_bytes,
                tgt.hidden_size,
            )
            self._host_s_memo[(tier, n_tokens, self.time_scale)] = memo
        return memo

    def _copy_s(self, tier: str) -> float:
        """Emulated seconds of one whole-expert copy from `tier` on idle links (`copy_time_s`), remembered."""
        memo = self._copy_s_memo.get((tier, self.time_scale))
        if memo is None:
            memo = copy_time_s(tier, self.emulated_expert_bytes, self.hardware) * self.time_scale
            self._copy_s_memo[(tier, self.time_scale)] = memo
        return memo

    def _host_time_s(self, key, n_tokens: int, now: float, host_queue_s: float) -> float:
        """The host's time for one expert once its earlier host work is done: its read after the traffic
        booked on the expert's device, then the compute."""
        queue_s = self.transfers.clock.device_queue_s(self._source(key), now + host_queue_s)
        return self._host_compute_s(key, n_tokens) + queue_s

    def _inflight_choice(self, key, n_tokens: int, host_queue_s: float = 0.0) -> tuple[str, float]:
        """A needed expert whose copy is in flight: wait for the copy, or compute it on the host now when
        that finishes sooner (`gate.miss_decision` between the two). Returns (choice, host seconds)."""
        tr = self.inflight[key][0]
        now = self.transfers.now_s()
        wait_s = max(0.0, tr.expected_done_s - now) + self._local_install_s
        host_s = self._host_time_s(key, n_tokens, now, host_queue_s) + self._local_host_s
        choice = miss_decision(
            MissCosts(fetch_s=float("inf"), inflight_s=wait_s, host_s=host_queue_s + host_s)
        )
        return choice, host_s

    def _miss_choice(
        self, key, n_tokens: int, host_queue_s: float = 0.0, protect=frozenset()
    ) -> tuple[str, float]:
        """`gate.miss_decision` for one miss; `host_queue_s` is the host compute already chosen in this
        visit, which the CPU does first (as the link queue is in the fetch's expected time). Returns
        (choice, this expert's host seconds), as the simulator's."""
        if self.policy.host_only:
            return "host", 0.0
        now = self.transfers.now_s()
        clock = self.transfers.clock
        tier_name = self._source(key)
        # The scheduler's choice (best copy or a striped read), plus what a fetch costs here beyond the
        # link: issuing it and installing the copy (measured on this machine, as the host's excess).
        fetch_s = self._plan(key).expected_s + self._local_fetch_s + self._local_install_s
        # The CPU starts on it after this visit's earlier host experts and the device's booked traffic.
        host_s = self._host_time_s(key, n_tokens, now, host_queue_s)
        lowp_s = None
        served = sum(self.c.miss_choices.values())
        if self.quality_budget > 0 and self.c.miss_choices["lowp"] < self.quality_budget * max(1, served):
            lowp_s = clock.expected_wait_s(tier_name, self.emulated_expert_bytes // 2, now)  # int8 of bf16
            lowp_s += self._local_fetch_s + self._local_install_s
        credit, promised = self._reuse_credit(key, host_s, tier_name)
        host_s += self._local_host_s
        costs = MissCosts(fetch_s=fetch_s, host_s=host_queue_s + host_s, lowp_s=lowp_s, reuse_credit_s=credit)
        choice = miss_decision(costs)
        if choice in ("fetch", "lowp") and not self.free_slots:
            # A copy takes a slot: the credit is what it saves later less what the victim would have
            # (only a copy's option can lose by it, so only then is the victim looked up).
            lost = self._victim_credit(n_tokens, protect)
            choice = miss_decision(replace(costs, reuse_credit_s=credit - lost))
        if choice in ("fetch", "lowp") and self.phase == "decode":
            # calibrated on decode copies: a prefill's pass pattern (a Switch encoder's layers) ends with it
            self._calibration.fetched(key, promised)
        return choice, host_s

    def _copy_for_later(self, key, n_tokens: int, protect) -> bool:
        """A miss computed on the host now: also copy it in the background for its later uses
        (`gate.copy_for_later`, with the victim's credit and the run's demand pressure)?"""
        if self.policy.host_only or self.policy.prefetch is None:
            return False
        one = self._copy_s(self._source(key))
        host_s = self._host_compute_s(key, n_tokens)
        credit = self._reuse_credit(key, host_s)[0]
        if not self.free_slots:
            credit -= self._victim_credit(n_tokens, protect)
        hits = sum(self.c.hits) + sum(self.c.inflight_hits)
        misses = sum(self.c.misses)
        fetched = max(0, misses - self.c.miss_choices["host"])
        layer_s = self._layer_s.get(self.phase) or one / 10
        upv = (hits + misses) / max(1, self.tick)
        pressure = demand_pressure(fetched, hits + misses - fetched, one, layer_s, upv)
        return copy_for_later(credit, pressure, one, host_s)

    def _victim_credit(self, n_tokens: int, protect) -> float:
        """What the copy a new one would evict is expected to save later (0 if nothing is evictable)."""
        victim = self._visit_victim(protect)
        if victim is None:
            return 0.0
        # Asked per miss: the victim's promise holds until the cache, the copies in flight (`_epoch`) or
        # the visit change; only the host's time depends on the miss's tokens (`gate.reuse_credit_s`).
        tag = (self._epoch, self.tick, victim)
        if self._victim_credit_memo[0] != tag:
            self._victim_credit_memo = (tag, self._promise(victim))
        promised, one = self._victim_credit_memo[1]
        return credit_of_reuses(
            promised, self._calibration.factor, self._host_compute_s(victim, n_tokens), one
        )

    _victim_credit_memo: tuple = (None, 0.0)

    def _visit_victim(self, protect):
        """The victim a copy issued now would evict (`_victim` of this visit's `protect` and the copies in
        flight), looked up once per cache change and visit (host-computed misses, dropped from
        `protect`, are not cached, so they do not change it)."""
        tag = (self._epoch, self.tick, id(protect))
        if self._miss_victim[0] != tag:
            self._miss_victim = (tag, self._victim(protect | self.inflight.keys()))
        return self._miss_victim[1]

    def _reuse_credit(self, key, host_s: float, tier: str | None = None) -> tuple[float, float]:
        """(Seconds a cached copy of `key` is expected to save later, the reuses promised for it):
        `gate.reuse_credit_s` with the run's reuse model and calibration."""
        promised, one = self._promise(key, tier)
        return credit_of_reuses(promised, self._calibration.factor, host_s, one), promised

    def _promise(self, key, tier: str | None = None) -> tuple[float, float]:
        """(`gate.expected_reuses` of a cached copy of `key` under the run's reuse model, the seconds of
        one copy of it): the parts of its reuse credit that do not depend on the host's time."""
        p_reuse, p_far, decay = self._reuse.far_near(key) if self._reuse is not None else (0.0, None, 0.8)
        rounds = self._calibration.rounds(
            self._reuse.rounds_cached(self.n_slots) if self._reuse is not None else 1.0,
            self.step if self.phase == "decode" else None,
        )
        until = self._reuse.layers_until(key[0]) / self.L if self._reuse is not None else 1.0
        return expected_reuses(p_reuse, rounds, until, p_far, decay), self._copy_s(tier or self._source(key))

    def _host_compute(self, m, co, ids, keys) -> float:
        """Experts `keys` computed where they live: activations come to the host, outputs go back
        (summed into this layer's host output over the visit's calls)."""
        t0, t0_clock = time.perf_counter(), self.transfers.now_s()
        if self._host_in is None:  # device -> host once per visit: N·D activations, not the weights
            xn = np.asarray(co.xn_BTD, np.float32)
            self._host_in = (xn, np.asarray(co.weights_BTK, np.float32), np.zeros(xn.shape, np.float32))
        xn, w, extra = self._host_in
        for key in keys:
            tier = self._source(key)
            packed = np.asarray(self.store.source(key, tier=tier), np.float32)
            mats = self.layout.unpack(packed)
            sel = ids == key[1]  # [B, T, K]
            rows = sel.any(-1)
            x = xn[rows]
            if len(mats) == 3:
                g, u = x @ mats[0], x @ mats[1]
                h = g / (1.0 + np.exp(-g)) * u
            else:
                h = np.maximum(x @ mats[0], 0.0)
            y = h @ mats[-1]
            extra[rows] += (w * sel).sum(-1)[rows][:, None] * y
            self.c.host_tokens += int(rows.sum())
            self._event("host_compute", layer=m, expert=key[1], tier=tier, tokens=int(rows.sum()))
        self._extra = extra.astype(np.dtype(self.layout.np_dtype))
        if self.emulate:
            # Each host expert reads its device after the traffic booked there (copies in flight,
            # earlier reads), one after another, as the simulator books them.
            cursor = t0_clock
            for k in keys:
                begin = self.transfers.reserve_host_read(self._source(k), cursor)
                cursor = begin + self._host_compute_s(k, int((ids == k[1]).sum()))
            left = cursor - self.transfers.now_s()
            if left > 0:
                time.sleep(left)
            # This machine's compute beyond the emulated figure, per expert (the miss decision adds it).
            self._local_host_s = _ema(self._local_host_s, max(0.0, -left) / len(keys))
        return time.perf_counter() - t0

    def experts_fn(self, h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E):
        """The expert step over the stored slot arrays (`experts` returns them), plus the outputs of the
        experts computed on the host this layer (their slots are -1)."""
        if self._extra is None:
            y = _stored_step_jit(
                h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, dtype=self.compute_dtype
            )
        else:
            extra, self._extra = self._extra, None
            y = _mixed_jit(
                h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra, dtype=self.compute_dtype
            )
        self._last_step = y
        return y

    def view(self, arrays) -> tuple:
        """Stored slot arrays (or rows gathered from them) in the experts' dtype."""
        return _view_jit(tuple(arrays), dtype=self.compute_dtype)

    # ---- cache mechanics -----------------------------------------------------------------------------
    def _source(self, key) -> str:
        """CXL-aware scheduling: of the expert's online copies, the one that would land first."""
        tier = self.store.only_copy(key)  # the common case: one copy, its home
        if tier is not None and tier not in self.offline:
            return tier
        tiers = [t for t in self.store.tiers_of(key) if t not in self.offline]
        if not tiers:
            self._rehome(key)
            tiers = [t for t in self.store.tiers_of(key) if t not in self.offline]
        if len(tiers) == 1:
            return tiers[0]
        now = self.transfers.now_s()
        clock = self.transfers.clock
        return min(tiers, key=lambda t: clock.expected_wait_s(t, self.emulated_expert_bytes, now))

    # Recency/frequency rules read the mutable stats directly: building frozen views of every cached
    # entry per miss costs more than the control-plane budget. Same order as `eviction_score`: the
    # stats field fifo and lru compare (loaded_at, last_use); lfu compares (uses, last_use).
    _FAST_EVICT = {"fifo": 2, "lru": 0, "lfu": None}

    def _take_slot(self, protect) -> int:
        if not self.free_slots:
            next_use = self._next_use() if self.policy.evict == "belady" else None
            if next_use is None and self._miss_victim[0] == (self._epoch, self.tick, id(protect)):
                victim = self._miss_victim[1]  # the miss decision just looked it up: nothing changed since
            else:
                victim = self._victim(protect | self.inflight.keys(), next_use)
            if victim is None:
                raise EngineError(
                    f"device cache of {self.n_slots} slots has nothing evictable (all needed now)"
                )
            self._evict(victim)
        return self.free_slots.pop()

    def _victim(self, skip, next_use=None):
        """The cached expert `choose_victims` would evict, never one in `skip` (None: nothing evictable).
        Rules whose score reads no frozen stats are scored here without building them (same choice)."""
        evict, cands = self.policy.evict, (k for k in self.slot_of if k not in skip)
        if evict in self._FAST_EVICT:
            field, stats = self._FAST_EVICT[evict], self.stats
            if field is None:
                return min(cands, key=lambda k: (stats[k][1], stats[k][0]), default=None)
            return min(cands, key=lambda k: stats[k][field], default=None)
        if evict == "predicted" and self._reuse is not None:
            slot_key, seq_S = self.slot_key, self._slot_seq_S
            for _, seq, s, key in self._ranking():
                if slot_key[s] == key and seq_S[s] == seq and key not in skip:
                    return key
            return None
        if evict == "belady":
            return min(
                cands, key=lambda k: eviction_score("belady", k, None, next_use=next_use), default=None
            )
        victims = choose_victims(
            evict, self.stats_cached(), 1, skip, next_use=next_use, prob=self._probs, reuse=self._reuse
        )
        return victims[0] if victims else None

    # The "predicted" rule's victims in order, kept across a visit's evictions: scores change only with
    # the reuse estimate (each visit) and the predictions (each prefetch round), so one vectorised scan
    # ranks every cached expert, a landing copy is inserted, and an evicted one is skipped when met
    # (its slot no longer holds it). The first entry not in `skip` is `farthest_reuse_slot`'s victim.
    _rank_tag = None
    _rank: list = []  # (-expected reuse distance, caching seq, slot, key), ascending
    _probs_map: dict = {}
    _probs_version = 0

    @property
    def _probs(self) -> dict:
        """The latest predictions {(layer, expert): p}, which the eviction rule reads."""
        return self._probs_map

    @_probs.setter
    def _probs(self, probs: dict):
        self._probs_map = probs
        self._probs_version += 1

    def _ranking(self) -> list:
        tag = (self._reuse.version, self._probs_version)
        if self._rank_tag != tag:
            occupied_S = self._slot_layer_S >= 0
            dist_S = reuse_distance_S(
                self._slot_layer_S, self._slot_expert_S, occupied_S, self._probs, self.slot_of, self._reuse
            )
            slots = np.flatnonzero(occupied_S)
            seq_S = self._slot_seq_S
            order = slots[np.lexsort((seq_S[slots], -dist_S[slots]))]
            slot_key = self.slot_key
            order_l = order.tolist()
            self._rank = list(
                zip((-dist_S[order]).tolist(), seq_S[order].tolist(), order_l, [slot_key[s] for s in order_l])
            )
            self._rank_tag = tag
        return self._rank

    def _ranked_landing(self, key, slot: int):
        """A copy landed in `slot`: rank it among the victims (if a ranking is current)."""
        if self._rank_tag is not None and self._rank_tag == (self._reuse.version, self._probs_version):
            d = expected_reuse_distance(key, self._probs, self._reuse)
            bisect.insort(self._rank, (-d, int(self._slot_seq_S[slot]), slot, key))

    def stats_cached(self):
        """Frozen views of the cached experts' statistics, for the pure eviction functions."""
        return {k: EntryStats(*self.stats[k]) for k in self.slot_of}

    def _evict(self, key):
        self._epoch += 1
        slot = self.slot_of.pop(key)
        self.slot_key[slot] = None
        self._slot_layer_S[slot] = -1
        self.slot_E[key[0]][key[1]] = -1
        st = self.stats.get(key)
        if st is not None and st[3] and st[1] == 0:
            self.c.wasted_prefetch_bytes += self.expert_bytes
        if st is not None and self.policy.host_compute:
            # the miss that fetched it was its first use; residence in rounds of the pass's layers
            cycle = len(self._reuse.pos_in_cycle) if self._reuse is not None else self.L
            self._calibration.evicted(key, st[1] - 1, (self.tick - st[2]) / max(1, cycle))
        self.lowp.discard(key)
        self.free_slots.append(slot)
        self.c.evictions += 1
        if self.record_events:
            self._event("evict", layer=key[0], expert=key[1])

    def _plan(self, key, low_precision: bool = False) -> striping.FetchPlan:
        """CXL-aware scheduling (`striping.plan_fetch`, shared with the simulator): of the expert's online
        whole copies the one that would land first, or its striped read where that lands sooner."""
        tier = self.store.only_copy(key)
        if tier is not None and tier not in self.offline and self.store.stripe_of(key) is None:
            # the common case, per miss: one whole copy, not striped (what plan_fetch would pick)
            clock, nbytes = self.transfers.clock, self.emulated_expert_bytes
            wait_s = clock.expected_wait_s(tier, nbytes, self.transfers.now_s())
            return striping.FetchPlan(
                (tier,), wait_s, False, "low-precision" if low_precision else "no-stripe"
            )
        if all(t in self.offline for t in self.store.tiers_of(key)):
            self._rehome(key)
        return striping.plan_fetch(
            self.store.tiers_of(key),
            self.store.stripe_of(key),
            self.transfers.clock,
            self.emulated_expert_bytes,
            self.transfers.now_s(),
            self.offline,
            low_precision,
            self.stripe_min_gain,
        )

    def _fetch(self, key, protect, prefetched: bool, low_precision: bool = False):
        t0, install_wait_s0 = time.perf_counter(), self._install_wait_s
        try:
            self._issue(key, protect, prefetched, low_precision)
        finally:
            busy = time.perf_counter() - t0 - (self._install_wait_s - install_wait_s0)
            self._local_fetch_s = _ema(self._local_fetch_s, busy)

    def _issue(self, key, protect, prefetched: bool, low_precision: bool = False):
        if self._landed and len(self.inflight) + len(self._landed) >= self.max_inflight:
            self._flush()  # staging holds landed copies: install them to make room
        slot = self._take_slot(protect)
        plan = self._plan(key, low_precision)
        tier = plan.label
        if plan.striped:
            tr = self.transfers.submit_striped(key, self.store.stripe_of(key))
            self.c.striped_fetches += 1
        else:
            tr = self.transfers.submit(key, tier, low_precision=low_precision)
            self.c.not_striped[plan.reason] += 1
        self.inflight[key] = (tr, slot, prefetched)
        self._epoch += 1
        for t, nbytes in tr.bytes_by_tier().items():
            self.c.bytes_by_tier[t] += nbytes
        self.c.max_queue = max(self.c.max_queue, len(self.inflight))
        if prefetched:
            self.c.prefetch_issued += 1
        if self.record_events:
            self._event(
                "prefetch" if prefetched else "fetch",
                layer=key[0],
                expert=key[1],
                tier=tier,
                nbytes=tr.nbytes,
                low_precision=low_precision,
            )

    def _complete(self, key):
        """Land a copy (blocking until it is there: stall) and map its slot; the write into the slot
        arrays waits for `_flush`, batched with the layer's other landed copies."""
        tr, slot, prefetched = self.inflight.pop(key)
        t0 = time.perf_counter()
        try:
            value = tr.result()
        except TransferError:
            self._wait_s += time.perf_counter() - t0
            if self.offline.isdisjoint(tr.tiers):
                raise
            # Its source went offline mid-copy: fetch again from another copy (or the master).
            self.c.refetches += 1
            self.free_slots.append(slot)
            self._fetch(key, {key}, prefetched=prefetched, low_precision=tr.low_precision)
            return self._complete(key)
        self._wait_s += time.perf_counter() - t0
        if tr.low_precision:
            self._cache = _install_int8(self.cache, value, np.int32(slot), self.layout)
            self.lowp.add(key)
        else:
            self._landed.append((value, slot))
        self._epoch += 1
        self.slot_of[key] = slot
        self.slot_key[slot] = key
        self._slot_layer_S[slot], self._slot_expert_S[slot] = key
        self._seq += 1
        self._slot_seq_S[slot] = self._seq
        if self._reuse is not None:
            self._ranked_landing(key, slot)
        self.slot_E[key[0]][key[1]] = slot
        # Mutable on the hot path: [last_use, uses, loaded_at, prefetched] (the EntryStats fields).
        self.stats[key] = [self.tick, 0, self.tick, prefetched]

    def _flush(self):
        """Write the landed copies into the slot arrays, `max_inflight` per jitted call (a fixed group
        size, so one compile); their staging is then free."""
        landed, self._landed = self._landed, []
        if self._last_step is not None and self._inline_installs:
            # XLA:CPU runs an in-place install inline, after the expert steps reading the slot arrays:
            # wait for them here, counted as device time (`install_wait_s`), not control.
            t0 = time.perf_counter()
            jax.block_until_ready(self._last_step)
            self._install_wait_s += time.perf_counter() - t0
        self._last_step = None
        G = self.max_inflight
        t0 = time.perf_counter()
        for i in range(0, len(landed), G):
            group = landed[i : i + G]
            group += group[-1:] * (G - len(group))
            values = tuple(v for v, _ in group)
            slots_G = np.array([slot for _, slot in group], np.int32)
            self._cache = _install(self._cache, values, slots_G, self.layout)
        if landed:
            self._local_install_s = _ema(self._local_install_s, (time.perf_counter() - t0) / len(landed))

    def _poll(self):
        if not self.inflight:
            return
        for key in [k for k, (tr, _, _) in self.inflight.items() if tr.done()]:
            self._complete(key)

    # ---- prefetch ------------------------------------------------------------------------------------

    def _prefetch(self, m: int, co, protect):
        pf = self.policy.prefetch
        if pf is None or self.policy.horizon <= 0:
            return
        if pf == "predictor" and hasattr(self.predictor, "observe"):  # history at every layer, the last too
            self.predictor.observe(self.phase, self.step, m, co.ids_BTK, co.weights_BTK)
        layers = [m + h for h in range(1, self.policy.horizon + 1) if m + h < self.L]
        if pf == "oracle":
            cands = self._oracle_candidates()
        elif self.phase == "prefill" and layers and co.ids_BTK.size >= self.E:
            # Prefill streams whole layers ahead: with at least E token-slots every expert is likely.
            cands = [((layers[0], e), 1.0) for e in range(self.E)]
        elif not layers:
            return
        elif pf == "pregate":
            scores = self._scores  # [H, B, T, E], read back with this layer's ids
            H = len(layers)
            probs = pregate_probs(scores.reshape(H, -1, self.E), self.K)
            cands = topk_candidates(probs, layers, min(self.E, max(self.K, int((probs > 0).sum(1).max()))))
            cands = [c for c in cands if c[1] > 0]
        elif pf == "eam":
            probs = eam_probs(self._eam_current, self._eam_library, layers)
            cands = topk_candidates(probs, layers, self.K)
        elif pf == "predictor" and self.predictor is not None:
            cands = self.predictor.candidates(self, m, co, layers)
        else:
            return
        self._probs = {k: p for k, p in cands}
        self._epoch += 1
        for key, p in cands:
            if key in self.slot_of or key in self.inflight:
                continue
            if len(self.inflight) >= self.max_inflight:
                break
            if self.policy.gate and not self._gate(key, p, m):
                self.c.gated += 1
                continue
            try:
                self._fetch(key, protect | {c[0] for c in cands if c[1] >= p}, prefetched=True)
            except EngineError:
                break

    _gate_victim: tuple = (None, None)  # (epoch, the victim a prefetch would evict then)
    _miss_victim: tuple = (None, None)  # ((epoch, tick, visit's protect), the victim a demand copy evicts)
    _epoch = 0  # bumped whenever the cache, the copies in flight or the predictions change

    def _gate(self, key, p, m) -> bool:
        plan = self._plan(key)
        nbytes = self.emulated_expert_bytes
        chunks = self.store.stripe_of(key).scaled_bytes(nbytes) if plan.striped else (nbytes,)
        one = copy_alone_s(self.transfers.clock, plan.tiers, chunks)  # the planned path, as wait_s
        # Compute per visit, measured (`_layer_s`); until measured, one/10 of a copy makes the gate decline.
        layer_s = self._layer_s.get(self.phase) or one / 10
        victim_p = 0.0
        if not self.free_slots:
            # The victim changes only when a copy is issued or lands: scan once per such change.
            if self._gate_victim[0] != self._epoch:
                self._gate_victim = (self._epoch, self._victim(self.inflight.keys()))
            victim = self._gate_victim[1]
            victim_p = self._probs.get(victim, 0.0) if victim is not None else 0.0
        hits = sum(self.c.hits) + sum(self.c.inflight_hits)
        misses = sum(self.c.misses)
        host_s, credit = None, 0.0
        if self.policy.host_compute:
            host_s = self._host_time_s(key, 1, self.transfers.now_s(), 0.0)
            if not self.policy.host_only:
                credit = self._reuse_credit(key, host_s)[0]
        return prefetch_gate(
            p,
            key[0] - m,
            layer_s,
            plan.expected_s,
            one,
            misses,
            hits,
            victim_p,
            uses_per_visit=(hits + misses) / max(1, self.tick),
            host_s=host_s,
            host_served=self.c.miss_choices["host"],
            reuse_credit_s=credit,
            can_fetch=not self.policy.host_only,
        )

    def _next_use(self):
        if self.trace is None:
            return {}
        return self._belady.at(self._pos)

    def _oracle_candidates(self):
        # Advance the trace pointer to the visit after the current one.
        self._pos += 1
        nxt = self.trace[self._pos : self._pos + self.policy.horizon]
        return [((layer, int(e)), 1.0) for layer, experts in nxt for e in experts]

    # ---- faults, re-homing, migration ----------------------------------------------------------------
    def set_offline(self, tier: str):
        """A device fails: no copy is read from it; its experts are re-homed (replica or host master)."""
        if tier not in self.hardware.tier_names:
            raise EngineError(f"unknown tier {tier!r}; tiers: {', '.join(self.hardware.tier_names)}")
        self.offline.add(tier)
        self.transfers.offline.add(tier)
        self._event("offline", tier=tier)
        for key in self.store.homed_on(tier):
            self._rehome(key)
        self.c.fault_events.append({"step": self.step, "tier": tier, "state": "offline"})

    def set_online(self, tier: str):
        """A device returns: experts whose original home it was move back (placement recovers)."""
        if tier not in self.hardware.tier_names:
            raise EngineError(f"unknown tier {tier!r}; tiers: {', '.join(self.hardware.tier_names)}")
        self.offline.discard(tier)
        self.transfers.offline.discard(tier)
        for key, home in self.original_home.items():
            if home == tier and self.store.home(key) != tier:
                self._migrate(key, tier)
        self._event("online", tier=tier)
        self.c.fault_events.append({"step": self.step, "tier": tier, "state": "online"})

    def _rehome(self, key):
        """Give `key` a home on an online tier: an existing copy, else one made from the host master."""
        online = [t for t in self.store.tiers_of(key) if t not in self.offline]
        if online:
            self.store.set_home(key, online[0])
            return
        target = self._tier_with_room(exclude=set(self.offline))
        if target is None:
            raise EngineError(f"expert {key}: every tier holding it is offline and no online tier has room")
        try:
            nbytes = self.store.add_copy(key, target)
        except Exception as e:  # the master is the last copy: never compute without the expert
            raise EngineError(f"expert {key} has no copy left to fetch: {e}") from e
        self.store.set_home(key, target)
        self.c.migration_bytes[target] += nbytes
        self.c.rehomed += 1
        self._event("rehome", layer=key[0], expert=key[1], tier=target)

    def _tier_with_room(self, exclude=frozenset(), prefer=("cxl", "dram", "nvme")):
        for kind in prefer:
            tiers = [t for t in self.hardware.tiers_of_kind(kind) if t.name not in exclude]
            if kind == "cxl":
                used = dict(self.store.used_bytes)
                t = placement_mod.select_cxl_device(
                    tiers, used, self.hardware, self.store.slot_bytes, {}, self.target_model.expert_bytes
                )
                if t is not None:
                    return t.name
                continue
            for t in tiers:
                if self.store.used_bytes.get(t.name, 0) + self.store.slot_bytes <= t.capacity_bytes:
                    return t.name
        return None

    def _migrate(self, key, target: str):
        """Move an expert's home to `target` (host-side copy, booked on both devices' clocks)."""
        src = self.store.home(key)
        if key in self.inflight and src in self.inflight[key][0].tiers:
            self._complete(key)  # a copy still reading the old home lands before that copy is dropped
        data = None
        if src not in self.offline and self.hardware.tier(src).kind != "nvme":
            data = np.asarray(self.store.source(key, tier=src))
        nbytes = self.store.add_copy(key, target, data)
        now = self.transfers.now_s()
        with self.transfers._lock:
            self.transfers.clock.reserve_device(target, self.emulated_expert_bytes, now)
            if src not in self.offline:
                self.transfers.clock.reserve_device(src, self.emulated_expert_bytes, now)
        self.store.set_home(key, target)
        if src != target:
            self.store.drop_copy(key, src)
        self.c.migration_bytes[target] += nbytes
        self.c.migrations += 1
        self._event("migrate", layer=key[0], expert=key[1], src=src, tier=target)

    def rebalance(self, max_moves: int | None = None, margin: float = 0.25):
        """Background migration: re-run placement on the EMA frequencies, move experts whose proposed
        tier is clearly better (hysteresis `margin`) and whose misses, over as many steps again as the
        request has run, save more than the move costs the devices (`placement.migration_pays`); only
        when no copy is in flight (idle links)."""
        if self.inflight:
            return 0
        online_tiers = [t for t in self.hardware.tier_names if t not in self.offline]
        hw = _restricted(self.hardware, online_tiers)
        try:
            proposal = placement_mod.initial_placement(
                hw,
                self.L,
                self.E,
                self.store.slot_bytes,
                self.freq_ema,
                self.target_model.expert_bytes,
                reader=self._reader,
            )
        except placement_mod.PlacementError:
            return 0
        moves = 0
        limit = max_moves if max_moves is not None else max(1, self.L * self.E // 16)
        score = placement_mod.tier_rank(hw, self._reader)
        order = np.argsort(-self.freq_ema.reshape(-1), kind="stable")
        nbytes, horizon = self.target_model.expert_bytes, max(1, self.step)
        c = self.c
        for flat in order:
            key = divmod(int(flat), self.E)
            cur, want = self.store.home(key), proposal[key]
            if cur == want or score.get(want, 0) < score.get(cur, 0) * (1 + margin):
                continue
            if (
                self.store.used_bytes.get(want, 0) + self.store.slot_bytes
                > self.hardware.tier(want).capacity_bytes
            ):
                continue
            m = key[0]
            miss_rate = (c.misses[m] + 1) / (c.misses[m] + c.hits[m] + c.inflight_hits[m] + 2)
            saved = placement_mod.use_s(cur, hw, nbytes, self._reader) - placement_mod.use_s(
                want, hw, nbytes, self._reader
            )
            cost = placement_mod.migration_s(cur, want, self.hardware, nbytes)
            if not placement_mod.migration_pays(self.freq_ema[key], miss_rate, saved, horizon, cost):
                continue
            self._migrate(key, want)
            moves += 1
            if moves >= limit:
                break
        return moves

    def _warm_start(self):
        """Algorithm 1's device step: fill the cache with the hottest experts before the first request."""
        order = np.argsort(-self.freq_ema.reshape(-1), kind="stable")
        for flat in order[: self.n_slots]:
            key = divmod(int(flat), self.E)
            self._fetch(key, set(), prefetched=False)
            self._complete(key)
            self.stats[key][1] = 0

    def replicate(self, n: int | None = None):
        """Replicate the hottest experts not on the device onto a second CXL device (scheduling then
        reads whichever copy lands first)."""
        n = self.replicate_hot if n is None else n
        cxl = [t.name for t in self.hardware.tiers_of_kind("cxl") if t.name not in self.offline]
        if len(cxl) < 2 or n <= 0:
            return 0
        done = 0
        for flat in np.argsort(-self.freq_ema.reshape(-1), kind="stable"):
            key = divmod(int(flat), self.E)
            if key in self.slot_of or len(self.store.tiers_of(key)) > 1:
                continue
            home = self.store.home(key)
            others = [t for t in cxl if t != home]
            target = self._tier_with_room(exclude={home} | set(self.offline), prefer=("cxl",))
            if target is None or target not in others:
                break
            self.c.migration_bytes[target] += self.store.add_copy(key, target)
            done += 1
            if done >= n:
                break
        return done

    def stripe(self, n: int | None = None, max_width: int = striping.MAX_WIDTH, kinds=("cxl",)) -> dict:
        """Stripe the hottest `n` experts (None: every one) across devices chosen by rate and load
        (`striping.stripe_placement`), where a striped read lands sooner than the home copy; the
        scheduler then picks per fetch. Returns {"striped": count, "skipped": {reason: count}}."""
        homes = {k: self.store.home(k) for k in self.store.home_of}
        stripes, skipped = striping.stripe_placement(
            self.hardware,
            homes,
            self.layout.nbytes,
            self.freq_ema if self.freq_ema.any() else None,
            used_bytes=dict(self.store.used_bytes),
            cost_bytes=self.emulated_expert_bytes,
            limit=n,
            kinds=kinds,
            offline=set(self.offline),
            max_width=max_width,
            min_gain=self.stripe_min_gain,
        )
        for key, st in stripes.items():
            self.store.add_stripe(key, st)
            for t, nbytes in zip(st.tiers, st.chunk_bytes):
                self.c.migration_bytes[t] += nbytes
        reasons: dict = defaultdict(int)
        for r in skipped.values():
            reasons[r] += 1
        self.stripe_report = {"striped": len(stripes), "skipped": dict(reasons)}
        return self.stripe_report

    # ---- visibility ------------------------------------------------------------------------------------
    def where(self) -> dict:
        """Where every expert is: its home tier, and whether it is on the device or in flight."""
        device = sorted(self.slot_of)
        return {
            "device": [
                {"layer": k[0], "expert": k[1], "slot": self.slot_of[k], "low_precision": k in self.lowp}
                for k in device
            ],
            "in_flight": [
                {"layer": k[0], "expert": k[1], "tier": tr.tier} for k, (tr, _, _) in self.inflight.items()
            ],
            "home": {f"{k[0]}:{k[1]}": t for k, t in sorted(self.store.home_of.items())},
            "copies": {t: len(self.store.experts_on(t)) for t in self.hardware.tier_names},
            "stripes": {f"{k[0]}:{k[1]}": list(s.tiers) for k, s in sorted(self.store.stripes.items())},
            "tiers": {t: len(self.store.homed_on(t)) for t in self.hardware.tier_names},
            "distribution": self.distribution(),
            "offline": sorted(self.offline),
            "numa": self.store.node_report,
        }

    def metrics(self) -> dict:
        c = self.c
        hits, misses = sum(c.hits) + sum(c.inflight_hits), sum(c.misses)
        visits = self.tick
        return {
            "policy": self.policy.name,
            "exact": self.policy.exact,
            "predictor": self.predictor_name,
            "hit_rate": hits / max(1, hits + misses),
            "hit_rate_by_layer": [
                (h + i) / max(1, h + i + mi) for h, i, mi in zip(c.hits, c.inflight_hits, c.misses)
            ],
            "misses": misses,
            "stall_s": c.stall_s,
            "install_wait_s": self._install_wait_s,
            "local_overhead_us": {  # measured here per expert (EMAs), added to the miss decision's times
                "fetch_issue": self._local_fetch_s * 1e6,
                "install": self._local_install_s * 1e6,
                "host_beyond_emulated": self._local_host_s * 1e6,
            },
            "stall_s_by_layer": list(c.stall_by_layer),
            "bytes_by_tier": dict(c.bytes_by_tier),
            "prefetch_issued": c.prefetch_issued,
            "prefetch_used": c.prefetch_used,
            "prefetch_precision": c.prefetch_used / c.prefetch_issued if c.prefetch_issued else None,
            "late_prefetches": c.late_prefetch,
            "wasted_prefetch_bytes": c.wasted_prefetch_bytes,
            "gated_prefetches": c.gated,
            "evictions": c.evictions,
            "migrations": c.migrations,
            "migration_bytes": dict(c.migration_bytes),
            "rehomed": c.rehomed,
            "miss_choices": dict(c.miss_choices),
            "host_computed_tokens": c.host_tokens,
            "inflight_host_computed": c.inflight_host,
            "copied_for_later": c.copied_for_later,
            "refetches": c.refetches,
            "striping": {
                "stripe_sets": len(self.store.stripes),
                "striped_fetches": c.striped_fetches,
                "not_striped": dict(c.not_striped),
                "sets_skipped": dict(self.stripe_report["skipped"]),
            },
            "faults": list(c.fault_events),
            "distribution": self.distribution(),
            "utilisation_by_tier": self.utilisation(),
            "max_inflight": c.max_queue,
            "control_us_per_layer": c.control_s / max(1, visits) * 1e6,
            "control_us_median_decode": float(np.median(c.control_samples_us))
            if c.control_samples_us
            else None,
            "control_after_us_median_decode": float(np.median(c.control_after_samples_us))
            if c.control_after_samples_us
            else None,
            "device_budget_bytes": self.budget_bytes,
            "device_slots": self.n_slots,
            "timing": "emulated"
            if self.emulate
            else ("measured-gpu" if jax.default_backend() == "gpu" else "measured-cpu"),
            "time_scale": self.time_scale,
            "hardware": self.hardware.name,
            "target_model": getattr(self.target_model, "name", "") or "self",
        }

    def distribution(self) -> dict:
        """Share of experts by tier kind: the device cache counts as hbm, the rest by home tier."""
        total = self.L * self.E
        kinds: dict[str, float] = {"hbm": len(self.slot_of) / total}
        for key, tier in self.store.home_of.items():
            if key in self.slot_of:
                continue
            k = self.hardware.tier(tier).kind
            kinds[k] = kinds.get(k, 0.0) + 1 / total
        return kinds

    def utilisation(self) -> dict:
        """Busy fraction of each tier's device since the engine started (emulated clock)."""
        elapsed = max(1e-9, self.transfers.now_s())
        return {t: b / elapsed for t, b in self.transfers.clock.busy_s_by_tier.items()}

    def reset_metrics(self):
        self.c = _Counters(self.L)
        self.events.clear()

    def dump_events(self, path):
        """JSON lines, one event each (written to a temp file, then renamed)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as f:
            for ev in self.events:
                f.write(json.dumps(ev) + "\n")
        os.replace(tmp, path)

    def close(self):
        self.transfers.close()
        self.store.close()


class _Counters:
    def __init__(self, L):
        self.hits = [0] * L
        self.inflight_hits = [0] * L
        self.misses = [0] * L
        self.stall_by_layer = [0.0] * L
        self.stall_s = 0.0
        self.control_s = 0.0
        self.bytes_by_tier = defaultdict(int)
        self.prefetch_issued = self.prefetch_used = self.late_prefetch = self.gated = 0
        self.wasted_prefetch_bytes = 0
        self.evictions = 0
        self.max_queue = 0
        self.control_samples_us: list[float] = []
        self.control_after_samples_us: list[float] = []  # prefetch decisions after the step's dispatch
        self.migrations = self.rehomed = self.refetches = 0
        self.migration_bytes = defaultdict(int)
        self.fault_events: list[dict] = []
        self.miss_choices = {"fetch": 0, "host": 0, "lowp": 0, "inflight": 0}
        self.host_tokens = 0
        self.striped_fetches = 0
        self.inflight_host = 0  # needed experts in flight computed on the host instead of waited for
        self.copied_for_later = 0  # host-computed misses also copied in the background for later tokens
        self.not_striped = defaultdict(int)  # why a fetch read one whole copy (striping.REASONS)


def _restricted(hw: Hardware, tier_names) -> Hardware:
    """The same hardware with only the named tiers (for placement while devices are offline)."""
    from dataclasses import replace as _replace

    keep = set(tier_names)
    return _replace(hw, tiers=tuple(t for t in hw.tiers if t.name in keep))


def _is_local(hw: Hardware) -> bool:
    return hw.gpu.name.lower() == "cpu"


def _future_from(trace, L: int) -> list[tuple[int, np.ndarray]]:
    """Visits (moe_layer, needed experts) in the order the engine will see them.

    `trace`: a GenerateResult of the same prompt (its expert_ids per layer [B, T_prompt+T_new-1, K]),
    or a list of per-step lists of per-layer id arrays.
    """
    if hasattr(trace, "expert_ids"):
        ids = trace.expert_ids
        T_p = trace.prompt_len
        visits = [(m, np.unique(ids[m][:, :T_p])) for m in range(L)]
        total = ids[0].shape[1]
        for t in range(T_p, total):
            visits += [(m, np.unique(ids[m][:, t])) for m in range(L)]
        return visits
    return [(m, np.unique(np.asarray(step[m]))) for step in trace for m in range(L)]


def layer_compute_s(model, batch: int = 1, repeats: int = 10) -> float:
    """Measured seconds of one decode-step MoE layer (core + experts, resident) on this machine."""
    from moecxl.generate import _core_jit, _experts_jit, split_flat

    cfg = model.cfg
    li = next(i for i, layer in enumerate(model.layers) if getattr(layer, "experts", None) is not None)
    key, leaves = split_flat(model.layers[li].core)
    core = _core_jit(*key)
    S = 64
    dt = model.embed_VD[...].dtype
    x = jnp.zeros((batch, 1, cfg.hidden_size), dt) + 0.1
    pos = np.zeros((batch, 1), np.int32)
    mask = np.ones((batch, 1, S), bool)
    ins, out = model.layers[li].experts.arrays()
    slot_E = np.arange(cfg.num_experts, dtype=np.int32)
    times = []
    for _ in range(repeats + 2):
        kv = tuple(jnp.zeros((batch, S, cfg.num_kv_heads, cfg.dim_head), dt) for _ in range(2))
        t0 = time.perf_counter()
        co, kv = core(leaves, x, pos, mask, kv, np.int32(0))
        y = _experts_jit(co.h_BTD, co.xn_BTD, co.weights_BTK, co.ids_BTK, ins, out, slot_E)
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def target_layer_s(target_cfg, hw: Hardware, batch: int = 1, context: int = 512) -> float:
    """Roofline seconds of one decode MoE layer of the target model on the profile's GPU."""
    D, K = target_cfg.hidden_size, target_cfg.top_k
    H, G, Dh = target_cfg.num_heads, target_cfg.num_kv_heads, target_cfg.dim_head
    bpe = 2  # bf16 weights on the target
    attn_params = D * (H * Dh) * 2 + D * (G * Dh) * 2
    experts_touched = min(target_cfg.num_experts, batch * K)
    bytes_ = (
        attn_params + experts_touched * target_cfg.expert_params
    ) * bpe + 2 * batch * context * G * Dh * bpe
    flops = 2 * batch * (attn_params + K * target_cfg.expert_params) + 4 * batch * context * H * Dh
    return max(bytes_ / (hw.gpu.memory_gbps * 1e9), flops / (hw.gpu.bf16_tflops * 1e12))


def calibrate_time_scale(model, hw: Hardware, target_cfg) -> float:
    """Measured layer time here over the target's roofline layer time: emulated copies use this scale."""
    return layer_compute_s(model) / target_layer_s(target_cfg, hw)
