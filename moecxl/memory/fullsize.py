"""A checkpoint with full-size experts (Mixtral-8x7B's d 4096 x ff 14336) and a small rest, for this machine.

    python -m moecxl.memory.fullsize make --out runs/fullsize-mixtral      # 2 MoE layers x 8 experts, 5.6 GB
    python -m moecxl.memory.fullsize make --out DIR --layers 1 --experts 2 # a 0.7 GB full-width case

Every run so far used experts of a few hundred KB, where memory use, copy rates and host-compute rates
at 352 MB per expert go untested. This writes an HF Mixtral checkpoint (config.json + safetensors shards
+ index, per-expert `w1/w2/w3` keys) that `moecxl.load` reads lazily: experts at the real size, random
N(0, 0.02) weights, a 1024-token vocabulary and narrow attention (8 heads of 128 over d 4096), so the
experts are >98% of the bytes. Tensors are generated and written in chunks (no copy of the model in
memory) into a temporary directory next to `--out`, renamed into place only when complete; free disk is
checked first, and the RAM a lazy load will need is stated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moecxl.config import ModelConfig
from moecxl.model.hf import GENERATION_CONFIG, HF_CONFIG, NP_DTYPES, config_to_hf, dense_key_map, param_shapes
from moecxl.model.safetensors_io import INDEX_FILE, _fsync_dir, _header_bytes, shard_plan, write_text_atomic

GB = 1e9
SHARD_BYTES = 2 * 1024**3
CHUNK = 1 << 24  # elements generated per step
DISK_MARGIN = 1.02  # headers, index, the filesystem's own slack
LOAD_RAM_FACTOR = 1.25  # a lazy load keeps the experts (plus a little) in host memory


class FullsizeError(RuntimeError):
    """The full-size checkpoint cannot be made or used here; the message says what is needed."""


def config(
    layers: int = 2, experts: int = 8, d_model: int = 4096, d_ff: int = 14336, top_k: int = 2
) -> ModelConfig:
    """Mixtral-8x7B's expert shape with few layers and a small vocabulary / attention."""
    return ModelConfig(
        family="mixtral",
        name=f"fullsize-mixtral-{layers}x{experts}-d{d_model}-f{d_ff}",
        vocab_size=1024,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        num_experts=experts,
        top_k=min(top_k, experts),
        max_position_embeddings=4096,
        dtype="bfloat16",
    )


@dataclass(frozen=True)
class Plan:
    """Every tensor of the checkpoint: HF key -> (shape, fill) with fill "normal" or "ones"."""

    cfg: ModelConfig
    tensors: dict[str, tuple[tuple[int, ...], str]]

    @property
    def itemsize(self) -> int:
        return NP_DTYPES[self.cfg.dtype].itemsize

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.tensors[key][0])) * self.itemsize

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.tensors if ".experts." in k)


def plan(cfg: ModelConfig) -> Plan:
    """The HF tensors of `cfg` in write order (dense first, then experts layer by layer)."""
    shapes = param_shapes(cfg)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for hf_key, ours, transpose in dense_key_map(cfg, lambda i: "block_sparse_moe"):
        shape = shapes[ours][::-1] if transpose else shapes[ours]
        tensors[hf_key] = (tuple(shape), "ones" if "norm" in hf_key else "normal")
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in cfg.moe_layers:
        for e in range(cfg.num_experts):
            base = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            for name, shape in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):  # torch Linear [out, in]
                tensors[f"{base}.{name}.weight"] = (shape, "normal")
    return Plan(cfg, tensors)


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs(p: Plan) -> dict[str, int]:
    """Bytes of disk the checkpoint takes and of RAM a lazy load of it holds."""
    return {
        "disk_bytes": int(p.total_bytes * DISK_MARGIN),
        "load_ram_bytes": int(p.expert_bytes * LOAD_RAM_FACTOR + (p.total_bytes - p.expert_bytes)),
    }


def check_disk(p: Plan, where: Path) -> None:
    free = shutil.disk_usage(where).free
    need = needs(p)["disk_bytes"]
    if free < need:
        raise FullsizeError(
            f"{where}: {free / GB:.1f} GB free, the checkpoint {p.cfg.name} needs {need / GB:.1f} GB "
            f"({p.expert_bytes / GB:.2f} GB of experts); free space or choose fewer --layers/--experts"
        )


def check_ram(p: Plan, what: str = "loading it") -> None:
    avail = mem_available_bytes()
    need = needs(p)["load_ram_bytes"]
    if avail is not None and avail < need:
        raise FullsizeError(
            f"{what} needs ~{need / GB:.1f} GB of host memory ({p.expert_bytes / GB:.2f} GB of experts), "
            f"{avail / GB:.1f} GB is available (MemAvailable); choose fewer --layers/--experts"
        )


def _placeholder(shape, dtype) -> np.ndarray:
    """An array with `shape` and `dtype` for the header that holds one element (no memory)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def _write_shard(path: Path, p: Plan, keys: list[str], rng: np.random.Generator) -> None:
    dt = NP_DTYPES[p.cfg.dtype]
    header = _header_bytes({k: _placeholder(p.tensors[k][0], dt) for k in keys}, {"format": "pt"})
    buf = np.empty(CHUNK, dt)
    with open(path, "wb") as f:
        f.write(header)
        for k in keys:
            shape, fill = p.tensors[k]
            n = int(np.prod(shape))
            for o in range(0, n, CHUNK):
                m = min(CHUNK, n - o)
                if fill == "ones":
                    buf[:m] = 1.0
                else:
                    buf[:m] = rng.standard_normal(m, dtype=np.float32) * 0.02
                f.write(buf[:m].view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def make(
    out: str | os.PathLike, cfg: ModelConfig | None = None, seed: int = 0, force: bool = False, log=print
) -> Path:
    """Write the checkpoint for `cfg` (default: 2 MoE layers x 8 full-size experts) to `out` atomically."""
    cfg = cfg or config()
    out = Path(out)
    if out.exists() and not force:
        raise FullsizeError(f"{out} exists; pass force=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    p = plan(cfg)
    need = needs(p)
    log(
        f"{cfg.name}: {len(p.tensors)} tensors, {p.total_bytes / GB:.2f} GB on disk "
        f"({p.expert_bytes / GB:.2f} GB of experts); a lazy load needs ~{need['load_ram_bytes'] / GB:.1f} GB RAM"
    )
    check_disk(p, out.parent)
    avail = mem_available_bytes()
    if avail is not None and avail < need["load_ram_bytes"]:
        log(f"note: {avail / GB:.1f} GB available now: not enough to load it on this machine")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rng = np.random.default_rng(seed)
        shards = shard_plan(((k, p.nbytes(k)) for k in p.tensors), SHARD_BYTES)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tmp / name, p, keys, rng)
            weight_map.update(dict.fromkeys(keys, name))
            log(f"  {name}: {sum(p.nbytes(k) for k in keys) / GB:.2f} GB")
        index = {"metadata": {"total_size": p.total_bytes, "format": "pt"}, "weight_map": weight_map}
        write_text_atomic(tmp / INDEX_FILE, json.dumps(index, indent=2))
        write_text_atomic(tmp / HF_CONFIG, json.dumps(config_to_hf(cfg), indent=2, sort_keys=True))
        write_text_atomic(tmp / GENERATION_CONFIG, json.dumps({"_from_model_config": True}, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        for f in (tmp, *tmp.iterdir()):  # mkdtemp/mkstemp make owner-only files; give them the usual modes
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        _fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write the checkpoint")
    mk.add_argument("--out", required=True)
    mk.add_argument("--layers", type=int, default=2, help="MoE layers")
    mk.add_argument("--experts", type=int, default=8, help="experts per layer")
    mk.add_argument("--d-model", type=int, default=4096)
    mk.add_argument("--d-ff", type=int, default=14336)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        make(
            args.out,
            config(args.layers, args.experts, args.d_model, args.d_ff),
            seed=args.seed,
            force=args.force,
            log=lambda s: print(s, flush=True),
        )
    except FullsizeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
