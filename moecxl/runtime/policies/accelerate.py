"""Hugging Face Accelerate's big-model inference (`device_map`), as it behaves (huggingface/accelerate):
`infer_auto_device_map` puts whole decoder layers on the GPU in order while they fit (keeping room for
the largest offloaded layer), the rest on the CPU; `AlignDevicesHook(offload=True)` copies every tensor
of an offloaded layer to the GPU when the layer runs (`set_module_tensor_to_device`, blocking) and drops
them after (`post_forward` -> meta). A MoE layer is one module: all its experts travel, routed or not.
No prefetch, no cache. (Pageable host memory is the deployment's: moecxl.sim.systems.)"""

from __future__ import annotations

from dataclasses import dataclass

from moecxl.runtime.policies.base import Policy, PolicyError
from moecxl.runtime.policies.streaming import lru_outside, release


@dataclass(frozen=True)
class Accelerate(Policy):
    """`resident_layers`: "auto" (as many whole layers as the budget holds besides one streamed layer,
    Accelerate's default) or a number (0: every layer streamed)."""

    resident_layers: int | str = "auto"

    def __post_init__(self):
        r = self.resident_layers
        if r != "auto" and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise PolicyError(
                f"policy {self.name!r}: resident_layers must be 'auto' or an integer >= 0, got {r!r}"
            )
        super().__post_init__()

    def resident(self, L: int, E: int, budget_slots: int) -> int:
        """Layers kept on the GPU for a budget of `budget_slots` experts."""
        if self.resident_layers == "auto":
            return L if budget_slots >= L * E else max(0, budget_slots // E - 1)
        return min(L, int(self.resident_layers), max(0, budget_slots // E - 1))

    def cache_slots(self, L: int, E: int, budget_slots: int) -> int:
        r = self.resident(L, E, budget_slots)
        return L * E if r >= L else (r + 1) * E

    def _resident_of(self, core) -> int:
        return core.L if core.n_slots >= core.L * core.E else core.n_slots // core.E - 1

    def demand(self, core, v):
        return tuple(range(core.E))  # the whole layer

    def on_visit(self, core, v) -> None:
        super().on_visit(core, v)
        release(core, set(range(self._resident_of(core))) | {v.layer})

    def victim(self, core, skip, incoming=None, next_use=None):
        return lru_outside(core, skip, set(range(self._resident_of(core))))


POLICY = Accelerate(
    "accelerate",
    evict="lru",
    description="Hugging Face Accelerate device_map offloading: whole layers resident while they fit, every "
    "other layer's experts all copied when it runs and dropped after",
)
