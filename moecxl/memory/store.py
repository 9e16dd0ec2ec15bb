"""Host master copies of the experts: one contiguous packed buffer per (MoE layer, expert).

Memory tiers (dram, cxl) keep their experts in one arena per tier, allocated under the tier's NUMA
node when this machine has it (verified with move_pages) and exposed to JAX as `pinned_host` arrays;
the NVMe tier keeps its experts in a file read back with real `pread`s. Packing all of an expert's
matrices into one buffer makes a transfer one copy.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from moecxl.memory import numa
from moecxl.memory.tiers import Hardware

ALIGN_BYTES = 4096  # experts start on page boundaries: aligned for pinned_host aliasing and O_DIRECT


class StoreError(ValueError):
    """The host store cannot hold or read an expert; the message names the tier, file and expert."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert's matrices sit in its packed buffer: shapes in order (ins..., out)."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s)) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.np_dtype).itemsize

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


def layout_of(model) -> ExpertLayout:
    """The expert layout of a model (every MoE layer of a model shares it)."""
    for layer in model.layers:
        if getattr(layer, "experts", None) is not None:
            ins, out = layer.experts.arrays()
            shapes = tuple(tuple(w.shape[1:]) for w in ins) + (tuple(out.shape[1:]),)
            return ExpertLayout(shapes, str(np.dtype(out.dtype)))
    raise StoreError("model has no MoE layer: nothing to offload")


def expert_matrices(model):
    """Per MoE layer: (ins, out) stacked arrays, in MoE-layer order."""
    return [layer.experts.arrays() for layer in model.layers if getattr(layer, "experts", None) is not None]


def quantize_int8(packed: np.ndarray, layout: ExpertLayout) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 copy of a packed expert (HOBBIT-style low-precision copy).

    Returns (q int8 [numel], scales float32 [rows]) with one scale per last-axis row of each matrix.
    """
    qs, scales = [], []
    for m in layout.unpack(packed.astype(np.float32)):
        rows = m.reshape(-1, m.shape[-1])
        s = np.maximum(np.abs(rows).max(axis=1), 1e-12) / 127.0
        qs.append(np.clip(np.rint(rows / s[:, None]), -127, 127).astype(np.int8).reshape(-1))
        scales.append(s.astype(np.float32))
    return np.concatenate(qs), np.concatenate(scales)


class HostStore:
    """Masters of every expert, each in its home tier (placement), packed and aligned."""

    def __init__(
        self,
        model,
        hardware: Hardware,
        placement: dict[tuple[int, int], str],
        nvme_dir: str | os.PathLike | None = None,
        low_precision: bool = False,
    ):
        self.layout = layout_of(model)
        self.hardware = hardware
        self.placement = dict(placement)
        self.slot_bytes = -(-self.layout.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        self._arenas: dict[str, np.ndarray] = {}
        self._offset: dict[tuple[int, int], int] = {}
        self._pinned: dict[tuple[int, int], jax.Array] = {}
        self._lowp: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._crc: dict[tuple[int, int], int] = {}
        self.node_report: dict[str, dict] = {}
        self._nvme_files: dict[str, Path] = {}
        self._tmpdir = None
        per_tier: dict[str, list[tuple[int, int]]] = {}
        for key, tier in sorted(self.placement.items()):
            if tier not in hardware.tier_names:
                raise StoreError(f"placement puts expert {key} on unknown tier {tier!r}")
            per_tier.setdefault(tier, []).append(key)
        mats = expert_matrices(model)
        for tier_name, keys in per_tier.items():
            tier = hardware.tier(tier_name)
            need = len(keys) * self.slot_bytes
            if need > tier.capacity_bytes:
                raise StoreError(
                    f"tier {tier_name!r} holds {tier.capacity_bytes} bytes; its {len(keys)} experts need {need}"
                )
            if tier.kind == "nvme":
                self._build_nvme(tier_name, keys, mats, nvme_dir)
            else:
                self._build_memory(tier_name, tier.numa_node, keys, mats)
            if low_precision:
                for key in keys:
                    self._lowp[key] = quantize_int8(self._host_view(key), self.layout)

    # ---- building ------------------------------------------------------------------------------------
    def _build_memory(self, tier_name, node, keys, mats):
        total = len(keys) * self.slot_bytes
        want = node if node is not None else 0
        present = want in numa.memory_nodes() if numa.supported() else False
        arena = numa.alloc_on_node(total, want if present else 0)
        report = {
            "numa_node_asked": node,
            "numa_node_used": want if present else 0,
            "emulated": not present and node is not None,
        }
        if numa.supported():
            pages = numa.node_of_pages(arena)
            report["pages_on_nodes"] = {int(n): int(c) for n, c in zip(*np.unique(pages, return_counts=True))}
        self.node_report[tier_name] = report
        self._arenas[tier_name] = arena
        for i, key in enumerate(keys):
            self._offset[key] = i * self.slot_bytes
            view = self._host_view(key)
            m, e = key
            ins, out = mats[m]
            self.layout.pack([w[e] for w in ins] + [out[e]], view)
            self._crc[key] = zlib.crc32(view.view(np.uint8))
            self._pinned[key] = _to_pinned_host(view)

    def _build_nvme(self, tier_name, keys, mats, nvme_dir):
        if nvme_dir is None:
            self._tmpdir = self._tmpdir or tempfile.TemporaryDirectory(prefix="moecxl-nvme-")
            nvme_dir = self._tmpdir.name
        path = Path(nvme_dir) / f"experts-{tier_name}.bin"
        tmp = path.with_suffix(".bin.tmp")
        buf = np.zeros(self.layout.numel, self.layout.np_dtype)
        with open(tmp, "wb") as f:
            for i, key in enumerate(keys):
                m, e = key
                ins, out = mats[m]
                self.layout.pack([w[e] for w in ins] + [out[e]], buf)
                raw = buf.view(np.uint8).tobytes()
                self._crc[key] = zlib.crc32(raw)
                self._offset[key] = i * self.slot_bytes
                f.seek(self._offset[key])
                f.write(raw)
            f.truncate(len(keys) * self.slot_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._nvme_files[tier_name] = path
        self.node_report[tier_name] = {"file": str(path)}

    # ---- reading -------------------------------------------------------------------------------------
    def _host_view(self, key) -> np.ndarray:
        tier = self.placement[key]
        arena = self._arenas[tier]
        o = self._offset[key]
        return arena[o : o + self.layout.nbytes].view(self.layout.np_dtype)

    def home(self, key) -> str:
        return self.placement[key]

    def source(self, key, low_precision: bool = False):
        """What a transfer copies from: a pinned_host array, an int8 pair, or a fresh NVMe read."""
        if low_precision:
            if key not in self._lowp:
                raise StoreError(
                    f"expert {key} has no low-precision copy (build the store with low_precision)"
                )
            return self._lowp[key]
        tier = self.placement[key]
        if tier in self._nvme_files:
            return self._read_nvme(key, tier)
        return self._pinned[key]

    def _read_nvme(self, key, tier) -> np.ndarray:
        path = self._nvme_files[tier]
        buf = np.empty(self.layout.nbytes, np.uint8)
        with open(path, "rb", buffering=0) as f:
            n = os.preadv(f.fileno(), [memoryview(buf)], self._offset[key])
        if n != self.layout.nbytes or zlib.crc32(buf) != self._crc[key]:
            raise StoreError(
                f"{path}: expert {key} at offset {self._offset[key]} is corrupted or truncated "
                f"(read {n} of {self.layout.nbytes} bytes, checksum mismatch)"
            )
        return buf.view(self.layout.np_dtype)

    def experts_on(self, tier: str) -> list[tuple[int, int]]:
        return [k for k, t in self.placement.items() if t == tier]

    def close(self):
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _to_pinned_host(view: np.ndarray) -> jax.Array:
    """A `pinned_host` JAX array over the buffer (aliased without a copy when 64-byte aligned)."""
    dev = jax.devices()[0]
    kinds = {m.kind for m in dev.addressable_memories()}
    kind = "pinned_host" if "pinned_host" in kinds else None
    sharding = jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)
    return jax.device_put(view, sharding)
