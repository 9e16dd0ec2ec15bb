"""The only code that moves expert bytes: asynchronous host-to-device copies, one queue per tier.

Every copy is real (`jax.device_put` from the master to the device: a memcpy on this machine, DMA on
a GPU). With emulation on, a copy also completes no earlier than the hardware profile predicts,
scaled by `time_scale` (DESIGN section 4): the reservation model below says when. The simulator uses
the same `LinkClock`, so engine and simulator agree on what a link can do.

Copies submitted `batched` are held per tier until `flush_batches`: each tier's then go as one
transfer (`TransferBatch`: one clock booking, one worker job, one `jax.device_put` of their list).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from moecxl.memory.tiers import Hardware, Tier


@dataclass
class LinkClock:
    """When copies finish: each tier (device) and each link is busy for bytes / its GB/s.

    A copy starts when both its tier's queue and its link are free of earlier copies, holds the
    device for bytes/read rate and the link for bytes/link rate, and completes after the longer of
    the two plus the fixed latency and per-copy overhead. Concurrent copies from two devices thus
    share the GPU link; copies from one device queue up (FIFO).

    The fixed cost is latency: it holds neither the device nor the link, so back-to-back copies
    from one tier overlap it with the next copy's bytes and k queued copies finish at k bytes-times
    plus ONE fixed cost. A batched copy (`joins`: several experts sent as one transfer) books the
    same bytes and all its experts complete at the batch's end. `serial_overhead` (a sensitivity,
    not a measured figure) makes the per-copy overhead hold the device and the link too, as a copy
    engine that cannot set up one copy while moving the previous one would; a batch then pays it
    once, where k separate copies pay it k times.
    """

    hardware: Hardware
    time_scale: float = 1.0
    tier_free_s: dict = field(default_factory=dict)
    link_free_s: dict = field(default_factory=dict)
    bytes_by_tier: dict = field(default_factory=dict)
    busy_s_by_tier: dict = field(default_factory=dict)
    serial_overhead: bool = False

    def duration_s(self, tier: Tier, nbytes: int) -> tuple[float, float, float]:
        """(device-busy, link-busy, fixed) seconds of one copy, unscaled."""
        link = self.hardware.link(tier.link) if tier.link else None
        dev_s = nbytes / (tier.read_gbps * 1e9)
        link_s = nbytes / (link.gbps * 1e9) if link else 0.0
        for hop in getattr(tier, "via", ()) or ():
            hop_link = self.hardware.link(hop)
            link_s = max(link_s, nbytes / (hop_link.gbps * 1e9))
        fixed_s = tier.latency_ns * 1e-9 + tier.copy_overhead_us * 1e-6
        return dev_s, link_s, fixed_s

    def holds_s(self, tier: Tier, nbytes: int, joins: bool = False) -> tuple[float, float, float, float]:
        """(device hold, link hold, after, device busy) seconds of one copy on the scaled clock: it holds
        its device and link for its bytes (with `serial_overhead`, plus the per-copy overhead unless it
        `joins` a batch that paid it) and completes `after` seconds after the later of the two."""
        dev_s, link_s, fixed_s = (x * self.time_scale for x in self.duration_s(tier, nbytes))
        if not self.serial_overhead:
            return dev_s, link_s, fixed_s, dev_s
        overhead_s = tier.copy_overhead_us * 1e-6 * self.time_scale
        held_s = 0.0 if joins else overhead_s
        return dev_s + held_s, link_s + held_s, fixed_s - overhead_s, dev_s

    def reserve(self, tier_name: str, nbytes: int, now_s: float, joins: bool = False) -> tuple[float, float]:
        """Book one copy submitted at `now_s`; returns (start_s, done_s) on the scaled clock. `joins`: the
        copy extends a batch booked just before it on this tier (one transfer: the batch's done_s is
        this call's, and the per-copy overhead was the batch's first member's)."""
        tier = self.hardware.tier(tier_name)
        dev_s, link_s, after_s, busy_s = self.holds_s(tier, nbytes, joins)
        link_name = tier.link or tier_name
        start = max(now_s, self.tier_free_s.get(tier_name, 0.0))
        link_start = max(now_s, self.link_free_s.get(link_name, 0.0))
        self.tier_free_s[tier_name] = start + dev_s
        self.link_free_s[link_name] = link_start + link_s
        done = max(start + dev_s, link_start + link_s) + after_s
        self.bytes_by_tier[tier_name] = self.bytes_by_tier.get(tier_name, 0) + nbytes
        self.busy_s_by_tier[tier_name] = self.busy_s_by_tier.get(tier_name, 0.0) + busy_s
        return start, done

    def reserve_device(self, tier_name: str, nbytes: int, now_s: float) -> float:
        """Book host-side traffic on a tier (a migration write or read): device busy, no GPU link."""
        tier = self.hardware.tier(tier_name)
        dev_s = nbytes / (min(tier.read_gbps, tier.write_gbps) * 1e9) * self.time_scale
        return self._hold_device(tier_name, dev_s, now_s) + dev_s

    def _hold_device(self, tier_name: str, dev_s: float, now_s: float) -> float:
        """Hold a tier's device for `dev_s` after its earlier traffic (no GPU link); returns the start."""
        start = max(now_s, self.tier_free_s.get(tier_name, 0.0))
        self.tier_free_s[tier_name] = start + dev_s
        self.busy_s_by_tier[tier_name] = self.busy_s_by_tier.get(tier_name, 0.0) + dev_s
        return start

    def device_queue_s(self, tier_name: str, now_s: float) -> float:
        """How long traffic submitted at `now_s` waits for earlier traffic on the tier's device."""
        return max(0.0, self.tier_free_s.get(tier_name, 0.0) - now_s)

    def reserve_host_read(self, tier_name: str, nbytes: int, now_s: float) -> float:
        """Book the host CPU streaming `nbytes` from a tier (an expert computed where it lives): the
        device is busy for bytes / its read rate after earlier traffic, and the GPU link is untouched.
        The CPU and the GPU's copies thus share the device: a host read waits for copies in flight
        from it, and later copies wait for the read. Returns the read's start on the scaled clock."""
        dev_s = nbytes / (self.hardware.tier(tier_name).read_gbps * 1e9) * self.time_scale
        return self._hold_device(tier_name, dev_s, now_s)

    def expected_wait_s(self, tier_name: str, nbytes: int, now_s: float) -> float:
        """How long a copy submitted now would take to finish (queue included), without booking it."""
        tier = self.hardware.tier(tier_name)
        dev_s, link_s, after_s, _ = self.holds_s(tier, nbytes)
        start = max(now_s, self.tier_free_s.get(tier_name, 0.0))
        link_start = max(now_s, self.link_free_s.get(tier.link or tier_name, 0.0))
        return max(start + dev_s, link_start + link_s) + after_s - now_s

    def reserve_stripe(self, tier_names, chunk_bytes, now_s: float) -> tuple[float, tuple[float, ...]]:
        """Book a striped read: one chunk copy per device, submitted together at `now_s`; each holds its
        device and the shared link for its own bytes. Returns (done_s of the last chunk, each chunk's)."""
        if len(tier_names) != len(chunk_bytes):
            raise ValueError(f"stripe over {list(tier_names)} given {len(chunk_bytes)} chunk sizes")
        dones = tuple(self.reserve(t, b, now_s)[1] for t, b in zip(tier_names, chunk_bytes))
        return max(dones), dones

    def expected_stripe_wait_s(self, tier_names, chunk_bytes, now_s: float) -> float:
        """How long a striped read submitted now would take (its last chunk), without booking it."""
        trial = LinkClock(
            self.hardware,
            self.time_scale,
            dict(self.tier_free_s),
            dict(self.link_free_s),
            serial_overhead=self.serial_overhead,
        )
        return trial.reserve_stripe(tier_names, chunk_bytes, now_s)[0] - now_s

    def link_floor_s(self, tier_names, chunk_bytes, now_s: float) -> float:
        """How long the chunks would take if their devices were idle and unbounded: the shared links'
        queues and rates alone (the best any striping of these bytes could do now)."""
        link_free: dict = {}
        done = now_s
        for name, nbytes in zip(tier_names, chunk_bytes):
            tier = self.hardware.tier(name)
            _, link_s, after_s, _ = self.holds_s(tier, nbytes)
            link = tier.link or name
            start = max(now_s, link_free.get(link, self.link_free_s.get(link, 0.0)))
            link_free[link] = start + link_s
            done = max(done, start + link_s + after_s)
        return done - now_s


class TransferError(RuntimeError):
    """A copy failed (source offline, corrupted file); the message names the expert and tier."""


@dataclass
class Transfer:
    """One copy in flight. `result()` blocks until the device buffer is there (emulated time too)."""

    key: tuple[int, int]
    tier: str
    nbytes: int
    low_precision: bool
    submitted_s: float
    expected_done_s: float
    done_event: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: BaseException | None = None
    copied_s: float = 0.0  # when the real copy finished
    chunk: int | None = None  # a striped read's chunk index (bytes of the tier's chunk buffer)
    virtual_now: object = None  # on a virtual clock: its `now_s`; the copy is done when that passes

    @property
    def tiers(self) -> tuple[str, ...]:
        return (self.tier,)

    def bytes_by_tier(self) -> dict[str, int]:
        return {self.tier: self.nbytes}

    def done(self) -> bool:
        if self.virtual_now is not None:  # deterministic: by the clock, whatever the copy thread did
            return self.virtual_now() >= self.expected_done_s
        return self.done_event.is_set()

    def result(self):
        self.done_event.wait()
        if self.error is not None:
            raise TransferError(
                f"copy of expert {self.key} from tier {self.tier!r} failed: {self.error}"
            ) from self.error
        return self.value


@dataclass(frozen=True)
class TransferBatch:
    """Several experts' copies from one tier as one worker job: one `jax.device_put` of the list of
    their packed buffers (JAX hands a list to the runtime as one batched transfer), every part done
    at the batch's booked time. A list, not one contiguous range: even where the store holds a layer's
    experts in adjacent page-aligned slabs (`model.hf.packed_expert_arrays`), a batch's experts are
    whichever of a layer's experts missed, rarely adjacent ids, and a range would carry the experts
    between them and the slabs' page padding, then need a split on the device."""

    tier: str
    parts: tuple[Transfer, ...]


class OpenBatches:
    """Copies submitted together, per source tier, not yet sent: a tier's copies go as one transfer and
    all complete when its last one's booking does (`LinkClock.reserve(joins=True)`)."""

    def __init__(self):
        self.by_tier: dict[str, list] = {}

    def joins(self, tier: str) -> bool:
        """Whether a copy from `tier` submitted now extends an open batch."""
        return tier in self.by_tier

    def add(self, tier: str, copy) -> None:
        """`copy` joins its tier's batch; the batch's members all land at its (latest) done time."""
        members = self.by_tier.setdefault(tier, [])
        members.append(copy)
        for m in members:
            m.expected_done_s = copy.expected_done_s

    def close(self) -> dict[str, list]:
        """The open batches, per tier, in submission order; none is open afterwards."""
        out, self.by_tier = self.by_tier, {}
        return out


@dataclass
class StripedTransfer:
    """One striped read in flight: a chunk copy per device, running concurrently on each device's queue;
    `result()` assembles the chunks on the device into the packed expert (bit-identical to one copy)."""

    key: tuple[int, int]
    parts: tuple[Transfer, ...]
    submitted_s: float
    expected_done_s: float
    low_precision: bool = False

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(p.tier for p in self.parts)

    @property
    def tier(self) -> str:
        return "+".join(self.tiers)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def bytes_by_tier(self) -> dict[str, int]:
        return {p.tier: p.nbytes for p in self.parts}

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    @property
    def virtual_now(self):
        return self.parts[0].virtual_now

    def result(self):
        chunks_P = [p.result() for p in self.parts]  # a failed chunk raises, naming its device
        return _assemble(chunks_P)


@jax.jit
def _assemble(chunks_P):
    return jnp.concatenate(chunks_P)


class Staging:
    """Pre-faulted host buffers that copies land in when the device's memory is host memory (XLA:CPU).

    `jax.device_put` of a stored expert to the CPU device allocates a fresh buffer per copy and faults
    in its pages (4 KiB each: 86k faults for a 352 MB Mixtral expert), which ran it at 0.15 of this
    machine's memcpy rate. Here a copy is one `memcpy` into a buffer faulted in once and reused; the
    device array aliases it (XLA:CPU takes a 64-byte-aligned numpy buffer without a copy). A buffer goes
    back to the pool only when XLA lets go of that array: when it is dropped and every computation
    reading it (the install into the slot arrays) has finished. Its wrapper's finalizer says when.
    On a GPU the copy is a DMA into device memory and this class is not used.
    """

    ALIGN = 64

    def __init__(self, keep: int = 4):
        self.keep = int(keep)  # free buffers kept per size; more are handed back to the OS
        self._free: dict[int, collections.deque] = {}
        self.allocated = 0  # buffers faulted in so far (a pool that keeps growing is a leak)

    def _take(self, nbytes: int) -> np.ndarray:
        free = self._free.setdefault(nbytes, collections.deque())
        try:
            return free.pop()  # atomic under the GIL: finalizers may append from any thread
        except IndexError:
            pass
        raw = np.empty(nbytes + self.ALIGN, np.uint8)
        offset = (-raw.ctypes.data) % self.ALIGN
        buf = raw[offset : offset + nbytes]
        buf.fill(0)  # fault every page in now, once, not on each copy
        self.allocated += 1
        return buf

    def _give(self, buf: np.ndarray) -> None:
        free = self._free.setdefault(buf.nbytes, collections.deque())
        if len(free) < self.keep:
            free.append(buf)

    def _stage(self, src) -> np.ndarray:
        """`src` (a numpy or host JAX array) copied once into a staging buffer that a device array may alias."""
        a = np.asarray(src)  # a host-memory JAX array (pinned_host on CPU) reads without a copy
        buf = self._take(a.nbytes)
        np.copyto(buf, a.reshape(-1).view(np.uint8))  # as bytes: one memcpy, whatever the dtype
        # A fresh array per copy over a memoryview (not an ndarray): numpy makes it the base of every
        # view taken from it, so whatever XLA keeps to alias the bytes holds it, and its finalizer runs
        # when XLA is done with the buffer.
        held = np.frombuffer(memoryview(buf), a.dtype)
        weakref.finalize(held, self._give, buf)
        return held.reshape(a.shape)

    def put(self, src, sharding) -> jax.Array:
        """`src` as a device array, through a staging buffer."""
        return jax.device_put(self._stage(src), sharding)

    def put_many(self, srcs, sharding) -> list:
        """Each of `srcs` staged, then all put on the device by one `jax.device_put` of the list."""
        return jax.device_put([self._stage(src) for src in srcs], sharding)


def host_device(sharding) -> bool:
    """Whether `sharding`'s device keeps its memory in host RAM (XLA:CPU): copies land via `Staging`."""
    return all(d.platform == "cpu" for d in sharding.device_set)


class TransferEngine:
    """One worker thread and FIFO queue per source tier; real copies, optionally emulated timing."""

    def __init__(
        self, store, hardware: Hardware, emulate: bool = True, time_scale: float = 1.0, virtual: bool = False
    ):
        """`virtual`: time is a number the caller advances (`advance_to`), not the wall clock; copies
        are real but land at the clock's time, so a run's decisions are deterministic (lock-step with
        the simulator)."""
        self.store = store
        self.hardware = hardware
        self.emulate = emulate
        self.virtual = virtual
        self._virtual_now_s = 0.0
        self.clock = LinkClock(hardware, time_scale)
        dev = jax.local_devices()[0]  # this process's first device (multi-process runs)
        self.device_sharding = jax.sharding.SingleDeviceSharding(dev)
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.offline: set[str] = set()
        self.emulated_bytes: int | None = None
        self.staging = Staging()  # used where the device's memory is host memory (`host_device`)
        self.open = OpenBatches()  # batched copies submitted, not yet sent (`flush_batches`)
        self.t0 = time.perf_counter()

    def now_s(self) -> float:
        if self.virtual:
            return self._virtual_now_s
        return time.perf_counter() - self.t0

    def advance_to(self, t_s: float) -> None:
        """On a virtual clock: time moves on to `t_s` (never back)."""
        self._virtual_now_s = max(self._virtual_now_s, t_s)

    def reserve_host_read(self, tier: str, at_s: float) -> float:
        """Book the host reading one (emulated-size) expert from `tier` at `at_s` (`LinkClock`); returns
        when the read can start, after the copies and reads booked on that device before it."""
        nbytes = self.emulated_bytes or self.store.layout.nbytes
        with self._lock:
            return self.clock.reserve_host_read(tier, nbytes, at_s)

    def submit(
        self,
        key,
        tier: str,
        low_precision: bool = False,
        clock_bytes: int | None = None,
        batched: bool = False,
    ) -> Transfer:
        """Copy `key` from `tier`; the clock books `clock_bytes` (default: the copy's bytes, scaled to
        the emulated expert's size). `batched` (whole-precision copies): the copy joins `tier`'s open
        batch, sent with it by `flush_batches` as one transfer (its fixed cost paid once)."""
        if batched and low_precision:
            raise TransferError(f"expert {key}: a low-precision copy (a pair of arrays) is not batched")
        if tier in self.offline:
            raise TransferError(f"tier {tier!r} is offline; cannot copy expert {key}")
        nbytes = self.store.layout.nbytes
        if low_precision:
            q, s = self.store.source(key, low_precision=True)
            nbytes = q.nbytes + s.nbytes
        # The clock books the bytes of the expert being emulated (e.g. a Mixtral expert), not ours.
        if clock_bytes is None:
            clock_bytes = nbytes
            if self.emulated_bytes:
                clock_bytes = int(nbytes * self.emulated_bytes / self.store.layout.nbytes)
        now = self.now_s()
        joins = batched and self.open.joins(tier)
        with self._lock:
            _, done = self.clock.reserve(tier, clock_bytes, now, joins=joins)
        t = Transfer(key, tier, nbytes, low_precision, now, done if self.emulate or self.virtual else now)
        if self.virtual:
            t.virtual_now = self.now_s
        if batched:
            self.open.add(tier, t)
        else:
            self._queue(tier).put(t)
        return t

    def flush_batches(self) -> list[int]:
        """Send the open batches, one job per tier; returns their sizes (experts per transfer)."""
        sizes = []
        for tier, parts in self.open.close().items():
            self._queue(tier).put(parts[0] if len(parts) == 1 else TransferBatch(tier, tuple(parts)))
            sizes.append(len(parts))
        return sizes

    def submit_striped(self, key, stripe) -> StripedTransfer:
        """Copy `key` as the chunks of `stripe` (a runtime.striping.StripeSet held by the store), one
        concurrent copy per device; the clock books each chunk on its device and the shared link."""
        off = [t for t in stripe.tiers if t in self.offline]
        if off:
            raise TransferError(f"stripe of expert {key} has chunks on offline tier(s) {off}")
        clock_bytes = stripe.scaled_bytes(self.emulated_bytes or self.store.layout.nbytes)
        now = self.now_s()
        with self._lock:
            done, dones = self.clock.reserve_stripe(stripe.tiers, clock_bytes, now)
        timed = self.emulate or self.virtual
        parts = tuple(
            Transfer(
                key,
                t,
                n,
                False,
                now,
                d if timed else now,
                chunk=i,
                virtual_now=self.now_s if self.virtual else None,
            )
            for i, (t, n, d) in enumerate(zip(stripe.tiers, stripe.chunk_bytes, dones))
        )
        for p in parts:
            self._queue(p.tier).put(p)
        return StripedTransfer(key, parts, now, done if timed else now)

    def _queue(self, tier: str) -> queue.Queue:
        q = self._queues.get(tier)
        if q is None:
            q = self._queues[tier] = queue.Queue()
            th = threading.Thread(target=self._worker, args=(q,), name=f"moecxl-copy-{tier}", daemon=True)
            th.start()
            self._threads.append(th)
        return q

    def _worker(self, q: queue.Queue):
        while True:
            job = q.get()
            if job is None:
                return
            parts = job.parts if isinstance(job, TransferBatch) else (job,)
            try:
                if job.tier in self.offline:
                    raise TransferError(f"tier {job.tier!r} went offline")
                values = self._copy(job)
                jax.block_until_ready(values)
                copied_s = self.now_s()
                wait = parts[-1].expected_done_s - copied_s  # a batch's parts share its done time
                if self.emulate and not self.virtual and wait > 0:
                    time.sleep(wait)
                for t, value in zip(parts, values):
                    t.copied_s, t.value = copied_s, value
            except BaseException as e:  # reported to whoever waits on the transfer (every part)
                for t in parts:
                    t.error = e
            for t in parts:
                t.done_event.set()

    def _copy(self, job) -> list:
        """The device values of a job's parts: one `device_put` of a batch's list, else of the one copy."""
        if isinstance(job, TransferBatch):
            srcs = [self.store.source(t.key, tier=t.tier) for t in job.parts]
            if host_device(self.device_sharding):
                return self.staging.put_many(srcs, self.device_sharding)
            return jax.device_put(srcs, self.device_sharding)
        if job.chunk is not None:
            return [self._to_device(self.store.chunk_source(job.key, job.tier))]
        src = self.store.source(job.key, job.low_precision, tier=job.tier)
        return [tuple(self._to_device(a) for a in src) if job.low_precision else self._to_device(src)]

    def _to_device(self, src):
        if host_device(self.device_sharding):
            return self.staging.put(src, self.device_sharding)
        return jax.device_put(src, self.device_sharding)

    def close(self):
        for q in self._queues.values():
            q.put(None)
        for th in self._threads:
            th.join(timeout=5)


def dequantize_int8(q_P, scales_R, layout):
    """Inverse of `store.quantize_int8` on the device: packed float buffer in the layout's dtype."""
    parts, o, r = [], 0, 0
    for shape, n in zip(layout.shapes, layout.sizes):
        rows = n // shape[-1]
        m = q_P[o : o + n].reshape(rows, shape[-1]).astype(jnp.float32) * scales_R[r : r + rows, None]
        parts.append(m.reshape(-1))
        o, r = o + n, r + rows
    return jnp.concatenate(parts).astype(np.dtype(layout.np_dtype))
