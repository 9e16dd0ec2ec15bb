"""Energy per token beside latency: bytes moved times cited pJ/bit, plus processor power times busy time.

    moving an expert  = bytes x 8 x (pJ/bit of the memory it is read from + pJ/bit of each link hop)
    host compute      = bytes the CPU reads x 8 x pJ/bit of that memory + CPU power x host compute time
    GPU               = busy power x compute time + idle power x the rest of the wall time (stalls)

GPU board power already covers its HBM traffic, so HBM is not counted again. Figures come from
`configs/hardware/library/energy.yaml`, each with its source; power at TDP makes the processor terms
upper bounds. The result is labelled simulated, as every figure of the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecxl.config import load_yaml
from moecxl.memory.tiers import Hardware

DEFAULT_ENERGY = Path(__file__).resolve().parents[2] / "configs" / "hardware" / "library" / "energy.yaml"


class EnergyError(ValueError):
    """An energy figure is missing or wrong; the message names the file and key."""


@dataclass(frozen=True)
class EnergyModel:
    memory_pj_per_bit: dict  # tier kind -> pJ/bit read
    link_pj_per_bit: dict  # link name prefix -> pJ/bit per hop
    gpu_watts: dict  # GPU name -> {"busy": W, "idle": W}
    cpu_watts: float
    sources: dict

    @classmethod
    def load(cls, path: str | Path = DEFAULT_ENERGY) -> EnergyModel:
        path = Path(path)
        data = load_yaml(path)
        sources: dict = {}

        def num(section: str, key: str, entry) -> float:
            v = entry.get("value") if isinstance(entry, dict) else entry
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise EnergyError(f"{path}: {section}.{key} must be a number >= 0 (with a source), got {v!r}")
            if not isinstance(entry, dict) or not entry.get("source"):
                raise EnergyError(f"{path}: {section}.{key} has no 'source'")
            sources[f"{section}.{key}"] = entry["source"]
            return float(v)

        try:
            mem = {k: num("memory_pj_per_bit", k, e) for k, e in data["memory_pj_per_bit"].items()}
            link = {k: num("link_pj_per_bit", k, e) for k, e in data["link_pj_per_bit"].items()}
            gpus = {
                g: {s: num(f"gpu_watts.{g}", s, e[s]) for s in ("busy", "idle")}
                for g, e in data["gpu_watts"].items()
            }
            cpu = num("cpu_watts", "busy", data["cpu_watts"]["busy"])
        except (KeyError, TypeError) as e:
            raise EnergyError(f"{path}: missing or malformed section {e}") from e
        return cls(mem, link, gpus, cpu, sources)

    def memory(self, kind: str) -> float:
        if kind not in self.memory_pj_per_bit:
            raise EnergyError(
                f"no memory_pj_per_bit for tier kind {kind!r}; known: {sorted(self.memory_pj_per_bit)}"
            )
        return self.memory_pj_per_bit[kind]

    def link(self, name: str) -> float:
        best = max((p for p in self.link_pj_per_bit if name.startswith(p)), key=len, default=None)
        if best is None:
            raise EnergyError(
                f"no link_pj_per_bit entry for link {name!r}; known prefixes: {sorted(self.link_pj_per_bit)}"
            )
        return self.link_pj_per_bit[best]

    def gpu(self, name: str) -> dict:
        if name not in self.gpu_watts:
            raise EnergyError(f"no gpu_watts for GPU {name!r}; known: {sorted(self.gpu_watts)}")
        return self.gpu_watts[name]


def path_pj_per_bit(em: EnergyModel, hw: Hardware, tier_name: str) -> float:
    """pJ/bit to bring one bit of `tier_name` into the GPU: the memory read plus every hop."""
    tier = hw.tier(tier_name)
    hops = [*tier.via, tier.link] if tier.link else list(tier.via)
    return em.memory(tier.kind) + sum(em.link(h) for h in hops)


def run_energy(m: dict, hw: Hardware, em: EnergyModel, tokens: int) -> dict:
    """Joules of one simulated run (its metrics `m`) and per generated token, by component."""
    if tokens <= 0:
        raise EnergyError(f"run_energy: tokens must be positive, got {tokens}")
    move = sum(n * 8 * path_pj_per_bit(em, hw, t) * 1e-12 for t, n in m["bytes_by_tier"].items())
    host_read = sum(
        n * 8 * em.memory(hw.tier(t).kind) * 1e-12 for t, n in m.get("host_read_bytes_by_tier", {}).items()
    )
    host_cpu = em.cpu_watts * m.get("host_compute_s", 0.0)
    g = em.gpu(hw.gpu.name)
    busy = m["gpu_busy_s"] * hw.gpu.count
    idle = max(0.0, m["wall_s"] - m["gpu_busy_s"]) * hw.gpu.count
    gpu = g["busy"] * busy + g["idle"] * idle
    total = move + host_read + host_cpu + gpu
    return {
        "j_per_token": total / tokens,
        "j_by_component": {
            "expert_copies": move,
            "host_reads": host_read,
            "host_cpu": host_cpu,
            "gpu": gpu,
        },
        "timing": "simulated",
        "note": "GPU and CPU at TDP while busy (upper bounds); data movement from cited pJ/bit",
    }
