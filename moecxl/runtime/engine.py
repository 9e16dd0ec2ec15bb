"""OffloadEngine: an `ExpertProvider` for `generate` and the decision core's mechanism on this machine.

Per MoE layer it reads the top-k ids (the one host sync), hands the visit to `DecisionCore`, and carries
out its actions: real copies, installs into fixed slot arrays (read through a slot map, so outputs are
bit-identical to the resident path), experts computed on the host by `memory.hostkernel`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moecxl.memory.hostkernel import expert_forward
from moecxl.memory.store import HostStore, layout_of
from moecxl.memory.tiers import Hardware
from moecxl.memory.transfer import TransferEngine, TransferError
from moecxl.model.bank import bank_of
from moecxl.model.expert_format import expert_format
from moecxl.runtime import homes, striping
from moecxl.runtime import placement as placement_mod
from moecxl.runtime.bank import check_bank, routers_ahead
from moecxl.runtime.calibrate import calibrate_time_scale, layer_compute_s, target_layer_s, with_host_kernel  # noqa: F401
from moecxl.runtime.core import FREQ_EMA_ALPHA, DecisionCore
from moecxl.runtime.grouped import grouped_step, visit_in_groups
from moecxl.runtime.mechanism import CopyFailed, CoreError
from moecxl.runtime.metrics import engine_metrics, where
from moecxl.runtime.policies import PolicyProtocol, get_policy
from moecxl.runtime.predictors import check_predictor, load_predictor
from moecxl.runtime.slots import (
    _install,
    _install_int8,
    _mixed_jit,
    _pregate_top,
    _stored_step_jit,
    _view_jit,
    budget_slots,
    storage_dtype,
)
from moecxl.runtime.visit import future_from, visit_of_ids

DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "cpu-local.yaml"
OVERHEAD_EMA_ALPHA = 0.1  # measured per-copy and per-host-expert overheads: ~10 samples of memory
LAYER_S_EMA_ALPHA = 0.2  # measured compute per layer visit, per phase: ~5 visits of memory


def _ema(old: float, new: float, alpha: float = OVERHEAD_EMA_ALPHA) -> float:
    return (1.0 - alpha) * old + alpha * new


_CORE_STATE = {"slot_of", "stats", "inflight", "events", "offline", "c", "tick", "phase", "step", "freq_ema"}
EngineError = CoreError  # bad engine configuration or a request it cannot serve; names the value at fault


class OffloadEngine:
    """Experts in host tiers, a device cache of `device_budget`, and a policy deciding what moves.

    The decisions are the `DecisionCore`'s (`engine.core`); the engine is its mechanism: real copies on
    the transfer engine, the device cache's slot arrays, the experts computed on the host, and the
    provider protocol `generate` drives. `device_budget`: a fraction of all expert bytes (0 < f <= 1) or
    a byte count (> 1); copies in flight count against it (`max_inflight` staging buffers). `emulate`:
    delay each copy to what the hardware profile predicts, time-scaled so that copy time over measured
    layer compute equals the target's (`time_scale`); `clock="virtual"`: time is a number advanced by
    `compute_s` per layer visit and `head_s` per step, copies land at the clock's time (lock-step with
    the simulator). `host_kernel` ("measure", a KernelTable or hostbench record): the host takes no
    less than that kernel's own time per expert (`calibrate.with_host_kernel`), in emulated runs too.
    `batch_copies`: the copies the core issues together from one tier (a visit's misses, a round of
    prefetches) go as one transfer: one clock booking, one `jax.device_put` of their list, all landing
    at its done time (`memory.transfer.TransferBatch`).
    """

    def __init__(
        self,
        model,
        hardware: Hardware | str | os.PathLike | None = None,
        policy: str | PolicyProtocol = "lru",
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
        ema_alpha: float = FREQ_EMA_ALPHA,
        replicate_hot: int = 0,
        warm_start: bool = False,
        quality_budget: float = 0.0,
        lowp_threshold: float = 0.3,
        device=None,
        clock: str = "wall",
        compute_s: float | None = None,
        head_s: float = 0.0,
        host_kernel=None,
        batch_copies: bool = False,
    ):
        self.bank = bank_of(model)  # what the runtime reads of the model: experts and routers per MoE layer
        check_bank(self.bank)
        self.cfg = self.bank.cfg
        policy = get_policy(policy)
        if isinstance(hardware, (str, os.PathLike)):
            hardware = Hardware.from_yaml(hardware)
        hardware = hardware if hardware is not None else Hardware.from_yaml(DEFAULT_PROFILE)
        self.hardware = with_host_kernel(hardware, host_kernel)  # the kernel's time floors the host's
        if clock not in ("wall", "virtual"):
            raise EngineError(f"clock must be 'wall' or 'virtual', got {clock!r}")
        if clock == "virtual" and compute_s is None:
            raise EngineError("clock='virtual' needs compute_s (seconds of compute per MoE layer visit)")
        self.virtual = clock == "virtual"
        self._compute_s, self._head_s = compute_s, head_s
        self.layout = layout_of(self.bank)
        self.fmt = expert_format(self.cfg)  # the experts' arrays and FFN (GPT-OSS: biases, MXFP4 bytes)
        if policy.host_compute and not self.fmt.host_kernel:
            raise EngineError(
                f"policy {policy.name!r} computes misses on the host, but the host kernel has no "
                f"{self.fmt.kind!r} experts (stored as {self.layout.dtype}; it reads SwiGLU / ReLU experts "
                "without biases or clamps); use a policy that copies them: moecxl instead of moecxl_nd or "
                "moecxl_host, or lru / pregate"
            )
        self.expert_bytes = self.layout.nbytes
        self.L, self.E, self.K = self.bank.num_layers, self.cfg.num_experts, self.cfg.top_k
        self.max_inflight = int(max_inflight if max_inflight is not None else max(2, self.K))
        self.budget_bytes, self.n_slots = budget_slots(
            device_budget, self.expert_bytes, self.L * self.E, self.K, self.max_inflight
        )
        self.n_slots = policy.cache_slots(self.L, self.E, self.n_slots)
        if policy.needs_future and trace is None:
            raise EngineError(
                f"policy {policy.name!r} reads the future: it needs trace= (the routing it will see, e.g. a "
                "resident run)"
            )
        if not 0.0 <= quality_budget <= 1.0:
            raise EngineError(
                f"quality_budget must be in [0, 1] (fraction of misses served in int8), got {quality_budget!r}"
            )
        if (policy.low_precision_on_miss or quality_budget > 0) and not jnp.issubdtype(
            self.layout.np_dtype, jnp.floating
        ):
            asked = (
                f"policy {policy.name!r}"
                if policy.low_precision_on_miss
                else f"quality_budget={quality_budget}"
            )
            raise EngineError(
                f"{asked} serves misses as int8 copies, which quantise float experts; these are "
                f"{self.fmt.kind!r} experts stored as {self.layout.dtype} (MXFP4 bytes, already 4-bit): use a "
                "policy that copies them as stored (moecxl, lru, pregate) and quality_budget=0"
            )
        if policy.host_compute and self.hardware.host is None:
            raise EngineError(
                f"policy {policy.name!r} computes misses on the host, but profile {self.hardware.name!r} "
                "has no `host:` block (gflops, mem_gbps with sources); add one, or measure this machine's "
                "with moecxl.memory.measure_host_matmul_tflops / measure_host_memcpy_gbps"
            )
        if isinstance(predictor, (str, os.PathLike)):
            predictor = load_predictor(predictor)
        if predictor is not None:
            check_predictor(predictor, self.L, self.E)
            if hasattr(predictor, "bind"):
                predictor.bind(
                    self.bank.model if self.bank.model is not None else self.bank
                )  # wrong L/E/K: refused
            policy = policy.with_predictor()
        self.policy = policy
        self.predictor = predictor
        freq = np.asarray(frequencies, float) if frequencies is not None else None
        self.target_model = target_model or self.cfg
        reader = "cpu" if policy.host_compute else "gpu"  # host-computing policies home near the CPU
        self.placement = placement or placement_mod.initial_placement(
            self.hardware,
            self.L,
            self.E,
            self.layout.slot_bytes,
            freq,
            self.target_model.expert_bytes,
            reader=reader,
        )
        self.store = HostStore(
            self.bank,
            self.hardware,
            self.placement,
            nvme_dir=nvme_dir,
            low_precision=policy.low_precision_on_miss or quality_budget > 0,  # int8 copies may be asked for
        )
        if emulate is None:
            emulate = self.hardware.gpu.name.lower() != "cpu"  # a local profile: copies as they come
        self.emulate = emulate or self.virtual
        if time_scale is None:
            time_scale = calibrate_time_scale(self.bank, self.hardware, self.target_model) if emulate else 1.0
        self.time_scale = time_scale
        self.transfers = TransferEngine(
            self.store, self.hardware, emulate=self.emulate, time_scale=time_scale, virtual=self.virtual
        )
        self.emulated_expert_bytes = self.target_model.expert_bytes if self.emulate else self.expert_bytes
        self.transfers.emulated_bytes = self.emulated_expert_bytes
        if device is not None:  # a host's engine in a multi-device run: copies land on this device
            self.transfers.device_sharding = jax.sharding.SingleDeviceSharding(device)
        # The mechanism's side of the protocol (`runtime.mechanism.Mechanism`).
        self.clock = self.transfers.clock
        self.books_host_reads = self.emulate
        self.fetch_overhead_s = self.install_overhead_s = self.host_overhead_s = 0.0  # measured here (EMAs)
        self._blocked_s = 0.0  # waiting for copies, computing on the host
        self._install_wait_s = 0.0  # an install waiting for expert steps still reading the slots
        self._layer_s: dict = {}  # measured compute per layer visit, by phase
        self._prev_visit = None  # (entry time, stall, phase) of the last visit
        self._owed_s = 0.0  # virtual clock: the dispatched layer's compute, counted at the next visit
        # Device cache: fixed slot arrays, committed where the copies land.
        self.compute_dtype = np.dtype(self.layout.np_dtype)
        dev_dtype = storage_dtype(self.compute_dtype)
        self._cache = tuple(
            jnp.zeros((self.n_slots, *s), dev_dtype, device=self.transfers.device_sharding)
            for s in self.layout.shapes
        )
        self._landed: list = []  # (value, slot) landed, not yet written into the slot arrays
        self._last_step = None  # the last expert step's output (what an install must wait for)
        self._inline_installs = jax.default_backend() == "cpu"
        self.n_ins = len(self.layout.shapes) - 1
        self._co = self._ids = None  # the visit's layer output and routing (host compute reads them)
        self._extra = self._group = None  # host-computed outputs; a grouped layer's partial outputs
        self._routers_ahead = None  # pre-gate: each layer's next `horizon` routers, sliced once
        if policy.needs_pregate:
            self._routers_ahead = routers_ahead(self.bank, policy.horizon)
        self.core = DecisionCore(
            policy=policy,
            hardware=self.hardware,
            store=self.store,
            mech=self,
            L=self.L,
            E=self.E,
            K=self.K,
            n_slots=self.n_slots,
            max_inflight=self.max_inflight,
            budget_bytes=self.budget_bytes,
            slot_bytes=self.expert_bytes,
            clock_bytes=self.emulated_expert_bytes,
            expert_params=self.target_model.expert_params,
            hidden_size=self.target_model.hidden_size,
            time_scale=time_scale,
            future=future_from(trace, self.L) if trace is not None else None,
            predictor=predictor,
            eam_library=eam_library,
            quality_budget=quality_budget,
            lowp_threshold=lowp_threshold,
            freq=freq,
            ema_alpha=ema_alpha,
            rebalance_every=rebalance_every,
            faults=getattr(self.hardware, "faults", ()) or (),
            record_events=record_events,
            reader=reader,
            batch_copies=batch_copies,
        )
        self.replicate_hot = int(replicate_hot)
        self.timeline: list[dict] = []  # per step: bytes and busy time per tier (utilisation)
        if warm_start:
            homes.warm_start(self.core)

    # ---- the core's state, read through (the decisions' state lives in `self.core`) ------------------
    def __getattr__(self, name: str):
        if name in _CORE_STATE and "core" in self.__dict__:
            return getattr(self.core, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def cache(self) -> tuple:
        """The slot arrays (ins..., out) with every landed copy installed, in the experts' dtype."""
        if self._landed:
            self._flush()
        return self.view(self._cache)

    # ---- the provider protocol (generate drives it) -----------------------------------------------------
    def begin(self, phase: str, step: int) -> None:
        self.core.begin(phase, step)

    def end(self, phase: str, step: int) -> None:
        if self.core.pending is not None or self._landed:
            self.after_experts(-1)
        if self.virtual:
            self.transfers.advance_to(self.now_s() + self._owed_s + self._head_s)
            self._owed_s = 0.0
        self.core.end(phase, step)
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

    def after_experts(self, m: int) -> None:
        """Called once layer `m`'s expert step is dispatched: installs of landed copies this layer did not
        read and the policy's prefetch for the layers ahead, off the critical path (their time is kept
        apart, as `control_after_samples_us`)."""
        if self.core.pending is None and not self._landed:
            return
        t0, install_wait_s0 = time.perf_counter(), self._install_wait_s
        self.core.after()
        if self._landed:
            self._flush()
        busy = time.perf_counter() - t0 - (self._install_wait_s - install_wait_s0)
        self.core.sample_control(busy, after=True)

    def experts(self, m: int, co):
        """Layer `m`'s experts made resident (or computed on the host): (ins, out, slot_E) for its step."""
        if self.core.pending is not None or self._landed:  # a caller that skips `after_experts`: now
            self.after_experts(m)
        if self.virtual and self._owed_s:
            self.transfers.advance_to(self.now_s() + self._owed_s)
            self._owed_s = 0.0
        t_enter = time.perf_counter()
        prev = self._prev_visit
        if prev is not None and m > 0 and prev[2] == self.core.phase:  # the gate's layer time, within a step
            dt = max(0.0, t_enter - prev[0] - prev[1])
            old = self._layer_s.get(self.core.phase)
            self._layer_s[self.core.phase] = dt if old is None else _ema(old, dt, LAYER_S_EMA_ALPHA)
        top_HNK = None
        if self._routers_ahead is not None and m + 1 < self.L:
            # Pre-gate: later routers on this layer's input, read back with the ids (one sync, not two).
            top = _pregate_top(co.xn_BTD, *self._routers_ahead[m], self.K)
            t_sync = time.perf_counter()
            ids, top = jax.device_get((co.ids_BTK, top))
            top_HNK = top.reshape(top.shape[0], -1, self.K)
        else:
            t_sync = time.perf_counter()
            ids = np.asarray(co.ids_BTK)  # the one host sync per MoE layer (waits for the layer's compute)
        sync_s = time.perf_counter() - t_sync
        core = self.core
        w = np.asarray(co.weights_BTK) if self.policy.low_precision_on_miss else None
        v = visit_of_ids(core.phase, core.step, m, ids, w, top_HNK)
        blocked0, install_wait_s0 = self._blocked_s, self._install_wait_s
        self._co, self._ids = co, ids
        groups = core.groups(v)  # more experts than the cache holds: processed in groups
        slot_E = core.visit(v, co) if len(groups) == 1 else visit_in_groups(self, groups, v, co)
        self._co = self._ids = None
        stall = self._blocked_s - blocked0
        if self.policy.gate:
            self._prev_visit = (t_enter, stall, core.phase)
        if self._landed:  # one install, now if this layer reads a landed copy, else after its dispatch
            pending = {slot for _, slot in self._landed}
            if any(slot_E[e] in pending for e in v.experts):
                self._flush()
        if self.virtual:
            self._owed_s = self._compute_s
        control = time.perf_counter() - t_enter - sync_s - stall - (self._install_wait_s - install_wait_s0)
        core.sample_control(control)
        cache = self._cache  # landed copies not installed yet are for other layers (`after_experts`)
        return cache[: self.n_ins], cache[self.n_ins], slot_E

    def experts_fn(self, h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E):
        """The expert step over the stored slot arrays (`experts` returns them), plus the outputs of the
        experts computed on the host this layer (their slots are -1)."""
        if self._group is not None:
            extra, self._extra = self._extra, None
            y = grouped_step(self, h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra)
        elif self._extra is None:
            y = _stored_step_jit(
                h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, dtype=self.compute_dtype, fmt=self.fmt
            )
        else:
            extra, self._extra = self._extra, None
            y = _mixed_jit(
                h_BTD, xn_BTD, weights_BTK, ids_BTK, ins, out, slot_E, extra, self.compute_dtype, self.fmt
            )
        self._last_step = y
        return y

    def view(self, arrays) -> tuple:
        """Stored slot arrays (or rows gathered from them) in the experts' dtype."""
        return _view_jit(tuple(arrays), dtype=self.compute_dtype)

    # ---- the mechanism (runtime.mechanism.Mechanism) ----------------------------------------------------
    def now_s(self) -> float:
        return self.transfers.now_s()

    def blocked_s(self) -> float:
        return self._blocked_s

    def layer_s(self, phase: str) -> float | None:
        return self._compute_s if self.virtual else self._layer_s.get(phase)

    def staged(self) -> int:
        return len(self._landed)

    def set_offline(self, tier: str, offline: bool = True) -> None:
        if not offline:  # `set_offline(tier, False)`: the core's way of saying a tier is back
            self.transfers.offline.discard(tier)
            return
        if tier in self.hardware.tier_names and tier in self.core.offline:
            self.transfers.offline.add(tier)
            return
        homes.set_offline(self.core, tier)  # a user's call: the core decides what moves

    def set_online(self, tier: str) -> None:
        homes.set_online(self.core, tier)

    def before_issue(self, n_inflight: int) -> None:
        if self._landed and n_inflight + len(self._landed) >= self.max_inflight:
            self._flush()  # staging holds landed copies: install them to make room

    def submit(self, key, plan, low_precision: bool, stripe, batched: bool = False):
        t0, install_wait_s0 = time.perf_counter(), self._install_wait_s
        try:
            if stripe is not None:
                return self.transfers.submit_striped(key, stripe)
            clock_bytes = self.core.lowp_bytes if low_precision else None  # as the core planned it
            return self.transfers.submit(
                key, plan.label, low_precision=low_precision, clock_bytes=clock_bytes, batched=batched
            )
        except TransferError as e:
            raise CopyFailed(str(e)) from e
        finally:
            if not self.virtual:  # a virtual clock counts no measured overhead: deterministic decisions
                busy = time.perf_counter() - t0 - (self._install_wait_s - install_wait_s0)
                self.fetch_overhead_s = _ema(self.fetch_overhead_s, busy)

    def flush_batches(self) -> None:
        self.transfers.flush_batches()

    def land(self, key, copy, slot: int) -> None:
        """Block until the copy is there; the write into the slot arrays waits for `_flush`, batched
        with the layer's other landed copies (an int8 copy is dequantised into its slot now)."""
        t0 = time.perf_counter()
        try:
            value = copy.result()
        except TransferError as e:
            raise CopyFailed(str(e)) from e
        finally:
            if self.virtual:
                self._advance_to(copy.expected_done_s)
            else:
                self._blocked_s += time.perf_counter() - t0
        if copy.low_precision:
            self._cache = _install_int8(self.cache, value, np.int32(slot), self.layout)
        else:
            self._landed.append((value, slot))

    def _advance_to(self, t_s: float) -> None:
        """Virtual clock: wait (blocked) until `t_s`."""
        before = self.now_s()
        self.transfers.advance_to(t_s)
        self._blocked_s += self.now_s() - before

    def reserve_host_read(self, tier: str, at_s: float) -> float:
        return self.transfers.reserve_host_read(tier, at_s)

    def hold_device(self, tier: str, now_s: float) -> float:
        with self.transfers._lock:
            return self.transfers.clock.reserve_device(tier, self.emulated_expert_bytes, now_s)

    def host_compute(self, layer: int, jobs, until_s: float) -> None:
        """Experts `jobs` ((key, tier, tokens)) computed where they live: activations come to the host,
        outputs go back (summed into this layer's host output over the visit's calls). Done no earlier
        than `until_s` (the core's booking of the host's reads and compute)."""
        t0 = time.perf_counter()
        co, ids = self._co, self._ids
        xn = np.asarray(co.xn_BTD, np.float32)
        w = np.asarray(co.weights_BTK, np.float32)
        extra = np.zeros(xn.shape, np.float32) if self._extra is None else self._extra.astype(np.float32)
        for key, tier, _ in jobs:
            sel = ids == key[1]  # [B, T, K]
            rows = sel.any(-1)
            # the host kernel reads the stored bytes where they live (no float32 copy of the expert)
            y = expert_forward(xn[rows], self.store.source(key, tier=tier), self.layout)
            extra[rows] += (w * sel).sum(-1)[rows][:, None] * y
        self._extra = extra.astype(self.compute_dtype)
        if self.virtual:
            return self._advance_to(until_s)
        if self.emulate:
            left = until_s - self.transfers.now_s()
            if left > 0:
                time.sleep(left)
            # This machine's compute beyond the emulated figure, per expert (the miss decision adds it).
            self.host_overhead_s = _ema(self.host_overhead_s, max(0.0, -left) / len(jobs))
        self._blocked_s += time.perf_counter() - t0

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
        if landed and not self.virtual:
            self.install_overhead_s = _ema(self.install_overhead_s, (time.perf_counter() - t0) / len(landed))

    # ---- mechanisms a user asks for --------------------------------------------------------------------
    def rebalance(self, max_moves: int | None = None, margin: float = homes.MIGRATION_MARGIN) -> int:
        return homes.rebalance(self.core, max_moves, margin)

    def replicate(self, n: int | None = None) -> int:
        return homes.replicate(self.core, self.replicate_hot if n is None else n)

    def stripe(self, n: int | None = None, max_width: int = striping.MAX_WIDTH, kinds=("cxl",)) -> dict:
        return homes.stripe(self.core, n, max_width, kinds)

    # ---- visibility ------------------------------------------------------------------------------------
    def where(self) -> dict:
        """Where every expert is: its home tier, and whether it is on the device or in flight."""
        return where(self.core)

    def metrics(self) -> dict:
        return engine_metrics(self)

    def utilisation(self) -> dict:
        """Busy fraction of each tier's device since the engine started (emulated clock)."""
        elapsed = max(1e-9, self.transfers.now_s())
        return {t: b / elapsed for t, b in self.transfers.clock.busy_s_by_tier.items()}

    def close(self):
        self.transfers.close()
        self.store.close()
