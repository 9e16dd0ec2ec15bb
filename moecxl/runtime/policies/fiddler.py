"""Fiddler (Kamahori et al., arXiv 2402.07033; efeslab/fiddler src/fiddler/mixtral.py), as it behaves:
experts are placed on the GPU in order of popularity (profiled offline) up to its free memory and never
move; a routed expert not there is computed on the CPU where it lives (activations to the host, outputs
back) unless its cost model prefers a copy: `latency_cpu = 7` per routed token against `latency_gpu = 70`
per copy, so at decode a missing expert is always computed on the CPU and in prefill copied when more
than 10 tokens route to it (into a placeholder that is not kept)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecxl.runtime.policies.base import Policy

CPU_COST_PER_TOKEN = 7.0  # fiddler/mixtral.py: self.latency_cpu
GPU_COPY_COST = 70.0  # fiddler/mixtral.py: self.latency_gpu


def popular(core, n: int) -> set:
    """The `n` most used experts of the past requests (Fiddler profiles popularity offline); without
    any, the run's activation frequencies; ties by (layer, expert)."""
    counts_LE = np.sum(core.eam_library, axis=0) if core.eam_library else np.asarray(core.freq_ema)
    order = np.lexsort((np.arange(counts_LE.size), -counts_LE.reshape(-1)))[:n]
    return {(int(i) // core.E, int(i) % core.E) for i in order}


@dataclass(frozen=True)
class Fiddler(Policy):
    def resident(self, core) -> set:
        """The experts Fiddler keeps on the GPU: the slots less one layer's placeholders."""
        return popular(core, max(0, core.n_slots - core.E))

    def miss(self, core, key, n_tokens: int, host_queue_s: float, protect):
        if key in self.resident(core):
            return ("fetch", 0.0)  # its fixed GPU copy, loaded once
        if n_tokens * CPU_COST_PER_TOKEN < GPU_COPY_COST:
            return ("host", core.host_time_s(key, n_tokens, core.mech.now_s(), host_queue_s))
        return ("fetch", 0.0)

    def victim(self, core, skip, incoming=None, next_use=None):
        """A placeholder (a copied non-resident expert) goes first, then the least recently used."""
        resident = self.resident(core)
        stats = core.stats
        free = [k for k in core.slot_of if k not in skip]
        pool = [k for k in free if k not in resident] or free
        return min(pool, key=lambda k: stats[k][0]) if pool else None


POLICY = Fiddler(
    "fiddler",
    evict="lru",
    exact=False,
    host_compute=True,
    description="Fiddler: popular experts fixed on the GPU; a missing one computed on the CPU where it lives "
    "(copied instead when 7 x tokens >= 70)",
)
