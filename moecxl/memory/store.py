"""Host copies of the experts: one contiguous packed buffer per (MoE layer, expert) per tier.

Memory tiers (dram, cxl) keep each copy in its own page-aligned buffer allocated under the tier's
NUMA node when this machine has it (verified with move_pages) and exposed to JAX as a `pinned_host`
array; the NVMe tier keeps copies in a file read back with real `pread`s and checked by CRC. An expert
may have copies on several tiers (its home plus replicas); the model's own host arrays are the
master from which a copy is (re)made when a device fails or placement moves an expert. Packing all
of an expert's matrices into one buffer makes a transfer one copy.

Held once: a checkpoint loaded by `moecxl.load` lays each expert out as one page-aligned packed slab
(`packed_slab`), and a memory tier that asks for no NUMA node of this machine, or for the node those
pages already lie on, holds the slab itself as its copy. The bytes are then the master's by
construction, so exact policies cannot tell the difference; a tier bound to another node still gets
its own buffer there. Int8 copies are quantised a block of rows at a time (no float32 expert).
"""

from __future__ import annotations

import functools
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from moecxl.memory import numa
from moecxl.memory.locations import ALIGN_BYTES, Locations, StoreError, pages  # noqa: F401 (re-exported)
from moecxl.memory.tiers import Hardware
from moecxl.model.bank import bank_of


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert's matrices sit in its packed buffer: shapes in order (ins..., out)."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    # Cached: the transfer path reads these per copy, and np.prod/np.dtype cost microseconds each.
    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.np_dtype).itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes one copy occupies in a tier (page-aligned)."""
        return pages(self.nbytes)

    @property
    def np_dtype(self):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        return np.dtype(self.dtype)

    def pack(self, mats, out: np.ndarray) -> None:
        """Write the matrices of one expert, raveled in order, into `out` [numel]."""
        o = 0
        for m, n in zip(mats, self.sizes):
            out[o : o + n] = np.asarray(m, dtype=self.np_dtype).reshape(-1)
            o += n

    def unpack(self, packed_P):
        """Split a packed buffer (numpy or jax) back into the matrices."""
        mats, o = [], 0
        for s, n in zip(self.shapes, self.sizes):
            mats.append(packed_P[o : o + n].reshape(s))
            o += n
        return tuple(mats)


def layout_of(source) -> ExpertLayout:
    """The expert layout of a model or `ExpertBank` (every MoE layer shares it)."""
    bank = bank_of(source)
    if bank.num_layers < 1:
        raise StoreError("model has no MoE layer: nothing to offload")
    ins, out = bank.arrays(0)
    shapes = tuple(tuple(w.shape[1:]) for w in ins) + (tuple(out.shape[1:]),)
    return ExpertLayout(shapes, str(np.dtype(out.dtype)))


def expert_matrices(source):
    """Per MoE layer of a model or `ExpertBank`: (ins, out) stacked arrays, in MoE-layer order."""
    bank = bank_of(source)
    return [bank.arrays(m) for m in range(bank.num_layers)]


QUANT_BLOCK_ROWS = 256  # rows converted to float32 at once by `quantize_int8` (not the whole expert)


def packed_slab(mats, layout: ExpertLayout) -> np.ndarray | None:
    """The packed expert [numel] these matrices already form, as a read-only view, or None.

    A loader that lays the experts out expert by expert (`model.hf.packed_expert_arrays`) leaves each
    expert's matrices back to back in one page-aligned slab: that slab is the packed expert, and the
    store can hold it as a copy without making one."""
    if not mats or not all(isinstance(m, np.ndarray) for m in mats) or mats[0].ctypes.data % ALIGN_BYTES:
        return None
    addr = mats[0].ctypes.data
    o = addr
    for m in mats:
        if m.dtype != layout.np_dtype or not m.flags.c_contiguous or m.ctypes.data != o:
            return None
        o += m.nbytes
    root = mats[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    lo = addr - root.ctypes.data
    if not root.flags.c_contiguous or lo < 0 or lo + layout.nbytes > root.nbytes:
        return None
    view = root.reshape(-1).view(np.uint8)[lo : lo + layout.nbytes].view(layout.np_dtype)
    view.flags.writeable = False
    return view


def quantize_int8(packed: np.ndarray, layout: ExpertLayout) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 copy of a packed expert (HOBBIT-style low-precision copy).

    Returns (q int8 [numel], scales float32 [rows]) with one scale per last-axis row of each matrix.
    """
    q = numa.aligned_zeros(layout.numel).view(np.int8)  # 64-byte aligned: the host kernel reads it in place
    scales = np.empty(sum(n // s[-1] for s, n in zip(layout.shapes, layout.sizes)), np.float32)
    o = r = 0
    for m in layout.unpack(packed):
        rows = m.reshape(-1, m.shape[-1])
        for lo in range(0, len(rows), QUANT_BLOCK_ROWS):  # float32 a block of rows at a time
            block = rows[lo : lo + QUANT_BLOCK_ROWS].astype(np.float32)
            s = np.maximum(np.abs(block).max(axis=1), 1e-12) / 127.0
            n = block.size
            q[o : o + n] = np.clip(np.rint(block / s[:, None]), -127, 127).astype(np.int8).reshape(-1)
            scales[r : r + len(block)] = s
            o, r = o + n, r + len(block)
    return q, scales


class _NvmeFile:
    """One tier's expert file: fixed-size slots, a free list, CRC per slot."""

    def __init__(self, path: Path, slot_bytes: int):
        self.path, self.slot_bytes = path, slot_bytes
        self.free: list[int] = []
        self.n_slots = 0
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb"):
            pass
        os.replace(tmp, path)

    def alloc(self) -> int:
        if self.free:
            return self.free.pop()
        self.n_slots += 1
        return self.n_slots - 1

    def write(self, slot: int, raw: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(slot * self.slot_bytes)
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


class HostStore(Locations):
    """Copies of every expert across host tiers; `placement` gives each expert's home tier."""

    def __init__(
        self,
        model,
        hardware: Hardware,
        placement: dict[tuple[int, int], str],
        nvme_dir: str | os.PathLike | None = None,
        low_precision: bool = False,
    ):
        self.layout = layout_of(model)
        super().__init__(hardware, self.layout.slot_bytes)
        self._mats = expert_matrices(model)  # the master: the model's own host arrays
        self._nvme_dir = Path(nvme_dir) if nvme_dir is not None else None
        self._tmpdir = None
        self._nvme: dict[str, _NvmeFile] = {}
        self._crc: dict[tuple[tuple[int, int], str], int] = {}
        self._lowp: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._chunks: dict[tuple[int, int], dict[str, tuple]] = {}  # key -> tier -> (buffer, pinned array)
        self.low_precision = low_precision
        # jax's issubdtype counts bfloat16 (an ml_dtypes type) as floating; numpy's does not
        if low_precision and not jax.numpy.issubdtype(self.layout.np_dtype, jax.numpy.floating):
            raise StoreError(
                f"int8 low-precision copies quantise float experts; these are stored as {self.layout.dtype} "
                "(MXFP4 bytes): use a policy without low-precision misses"
            )
        for key, tier in sorted(placement.items()):
            self.add_copy(key, tier)
            self.home_of[key] = tier
            if low_precision:
                self._lowp[key] = quantize_int8(self.master(key), self.layout)

    # ---- copies --------------------------------------------------------------------------------------
    def master(self, key) -> np.ndarray:
        """The expert packed from the model's host arrays (the copy of last resort): their own slab
        when the loader packed them (read-only, no copy), else a packed copy."""
        m, e = key
        if not 0 <= m < len(self._mats):
            raise StoreError(f"expert {key}: no MoE layer {m} (model has {len(self._mats)})")
        ins, out = self._mats[m]
        mats = [w[e] for w in ins] + [out[e]]
        slab = packed_slab(mats, self.layout)
        if slab is not None:
            return slab
        buf = np.empty(self.layout.numel, self.layout.np_dtype)
        self.layout.pack(mats, buf)
        return buf

    def add_copy(self, key, tier_name: str, data: np.ndarray | None = None) -> int:
        """Place a copy of `key` on `tier_name` (from `data` or the master); returns bytes written."""
        if tier_name in self.hardware.tier_names and self.hardware.tier(tier_name).kind == "hbm":
            raise StoreError(
                f"expert {key}: tier {tier_name!r} is the device; host copies live in other tiers"
            )
        if tier_name in self._copies.get(key, {}):
            return 0
        self.check_room(key, tier_name, self.slot_bytes)
        tier, copies = self.hardware.tier(tier_name), self._copies.setdefault(key, {})
        used = self.used_bytes.get(tier_name, 0)
        packed = self.master(key) if data is None else data
        if tier.kind == "nvme":
            f = self._nvme_file(tier_name)
            slot = f.alloc()
            raw = np.ascontiguousarray(packed).view(np.uint8).tobytes()
            f.write(slot, raw)
            self._crc[(key, tier_name)] = zlib.crc32(raw)
            copies[tier_name] = slot
        elif self._can_hold(tier_name, packed):
            # The model's own packed slab is this copy (bit for bit the master: it is the master), so
            # the experts are held once, not once per tier.
            copies[tier_name] = (packed, _to_pinned_host(packed))
        else:
            buf = self._alloc_on_tier(tier_name, tier.numa_node)
            view = buf[: self.layout.nbytes].view(self.layout.np_dtype)
            view[:] = packed
            copies[tier_name] = (buf, _to_pinned_host(view))
        self.used_bytes[tier_name] = used + self.slot_bytes
        return self.layout.nbytes

    def drop_copy(self, key, tier_name: str) -> None:
        copies = self._copies.get(key, {})
        if tier_name not in copies:
            return
        held = copies.pop(tier_name)
        if tier_name in self._nvme:
            self._nvme[tier_name].free.append(held)
        self.used_bytes[tier_name] -= self.slot_bytes

    # ---- stripes: an expert as byte-range chunks, one per device ------------------------------------
    def add_stripe(self, key, stripe, data: np.ndarray | None = None) -> int:
        """Store `key` as the chunks of `stripe` (each in its own page-aligned buffer on its tier's NUMA
        node); returns bytes written. Unknown or non-memory tiers and a size mismatch are errors."""
        if stripe.nbytes != self.layout.nbytes:
            raise StoreError(
                f"expert {key}: stripe covers {stripe.nbytes} bytes but the packed expert has {self.layout.nbytes}"
            )
        for t in stripe.tiers:
            if t not in self.hardware.tier_names:
                raise StoreError(
                    f"expert {key}: stripe names unknown tier {t!r}; tiers: {', '.join(self.hardware.tier_names)}"
                )
            if self.hardware.tier(t).kind not in ("cxl", "dram"):
                raise StoreError(
                    f"expert {key}: stripe chunk on {t!r} ({self.hardware.tier(t).kind}); memory tiers only"
                )
        sizes = [pages(n) for n in stripe.chunk_bytes]
        for t, n in zip(stripe.tiers, sizes):
            self.check_room(key, t, n, what="a chunk of expert")
        self.drop_stripe(key)
        raw = np.ascontiguousarray(self.master(key) if data is None else data).view(np.uint8)
        chunks = {}
        for t, lo, hi, n in zip(stripe.tiers, stripe.bounds, stripe.bounds[1:], sizes):
            node = self.hardware.tier(t).numa_node
            buf = self._alloc_on_tier(t, node, n)
            view = buf[: hi - lo]
            view[:] = raw[lo:hi]
            chunks[t] = (buf, _to_pinned_host(view.view(self.layout.np_dtype)))
            self.used_bytes[t] = self.used_bytes.get(t, 0) + n
        self.stripes[key], self._chunks[key] = stripe, chunks
        return self.layout.nbytes

    def drop_stripe(self, key) -> None:
        self._chunks.pop(key, None)
        super().drop_stripe(key)

    def chunk_source(self, key, tier: str):
        """What a chunk copy reads: the pinned_host array of `key`'s chunk on `tier`."""
        chunk = self._chunks.get(key, {}).get(tier)
        if chunk is None:
            raise StoreError(
                f"expert {key} has no stripe chunk on tier {tier!r} (stripe: {self.stripes.get(key)})"
            )
        return chunk[1]

    # ---- reading -------------------------------------------------------------------------------------
    def source(self, key, low_precision: bool = False, tier: str | None = None):
        """What a transfer copies from: a pinned_host array, an int8 pair, or a fresh NVMe read."""
        if low_precision:
            if key not in self._lowp:
                raise StoreError(
                    f"expert {key} has no low-precision copy (build the store with low_precision)"
                )
            return self._lowp[key]
        tier = tier or self.home_of[key]
        held = self._copies.get(key, {}).get(tier)
        if held is None:
            raise StoreError(f"expert {key} has no copy on tier {tier!r} (copies on: {self.tiers_of(key)})")
        if tier in self._nvme:
            return self._read_nvme(key, tier, held)
        return held[1]

    def _read_nvme(self, key, tier, slot) -> np.ndarray:
        f = self._nvme[tier]
        buf = np.empty(self.layout.nbytes, np.uint8)
        with open(f.path, "rb", buffering=0) as fh:
            n = os.preadv(fh.fileno(), [memoryview(buf)], slot * f.slot_bytes)
        if n != self.layout.nbytes or zlib.crc32(buf) != self._crc[(key, tier)]:
            raise StoreError(
                f"{f.path}: expert {key} at offset {slot * f.slot_bytes} is corrupted or truncated "
                f"(read {n} of {self.layout.nbytes} bytes, checksum mismatch)"
            )
        return buf.view(self.layout.np_dtype)

    # ---- allocation ----------------------------------------------------------------------------------
    def _can_hold(self, tier_name: str, packed) -> bool:
        """Whether `packed` (a read-only slab of the model's) can serve as the copy on `tier_name`: the
        tier asks no NUMA node this machine has (an emulated tier), or the slab's pages already all lie
        on the node it asks for (move_pages). Otherwise the copy gets its own buffer on that node."""
        if not _shareable(packed):
            return False
        node = self.hardware.tier(tier_name).numa_node
        bound = numa.supported() and node is not None and node in numa.memory_nodes()
        on_nodes = numa.node_of_pages(packed) if numa.supported() else None
        if bound and not np.all(on_nodes == node):
            return False
        if tier_name not in self.node_report:
            report = {"numa_node_asked": node, "numa_node_used": node if bound else None}
            report |= {"emulated": node is not None and not bound, "aliases_model_arrays": True}
            if on_nodes is not None:
                report["pages_on_nodes"] = {
                    int(n): int(c) for n, c in zip(*np.unique(on_nodes, return_counts=True))
                }
            self.node_report[tier_name] = report
        return True

    def _alloc_on_tier(self, tier_name: str, node: int | None, nbytes: int | None = None) -> np.ndarray:
        present = numa.supported() and node is not None and node in numa.memory_nodes()
        use = node if present else 0
        buf = numa.alloc_on_node(self.slot_bytes if nbytes is None else nbytes, use)
        if tier_name not in self.node_report:
            report = {
                "numa_node_asked": node,
                "numa_node_used": use,
                "emulated": node is not None and not present,
            }
            if numa.supported():
                node_of_page = numa.node_of_pages(buf)
                report["pages_on_nodes"] = {
                    int(n): int(c) for n, c in zip(*np.unique(node_of_page, return_counts=True))
                }
            self.node_report[tier_name] = report
        return buf

    def _nvme_file(self, tier_name: str) -> _NvmeFile:
        f = self._nvme.get(tier_name)
        if f is None:
            if self._nvme_dir is None:
                self._tmpdir = self._tmpdir or tempfile.TemporaryDirectory(prefix="moecxl-nvme-")
                self._nvme_dir = Path(self._tmpdir.name)
            f = self._nvme[tier_name] = _NvmeFile(
                self._nvme_dir / f"experts-{tier_name}.bin", self.slot_bytes
            )
            self.node_report[tier_name] = {"file": str(f.path)}
        return f

    def close(self):
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _shareable(packed: np.ndarray) -> bool:
    """Whether `packed` is a read-only slab view from `packed_slab` (safe to hold as a copy)."""
    return (
        isinstance(packed, np.ndarray)
        and not packed.flags.writeable
        and packed.ctypes.data % ALIGN_BYTES == 0
    )


def _to_pinned_host(view: np.ndarray) -> jax.Array:
    """A `pinned_host` JAX array over the buffer (aliased without a copy when 64-byte aligned)."""
    dev = jax.local_devices()[0]  # this process's first device (multi-process runs)
    kinds = {m.kind for m in dev.addressable_memories()}
    kind = "pinned_host" if "pinned_host" in kinds else None
    sharding = jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)
    return jax.device_put(view, sharding)
