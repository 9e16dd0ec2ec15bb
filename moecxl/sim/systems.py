"""The published systems as the simulator deploys them: which policy decides, on which software stack,
from which kind of host memory, with which cache size and budget.

The decisions of each system (what it makes resident, prefetches, evicts, how it serves a miss) are a
policy in `moecxl.runtime.policies`, shared with the engine; docs/systems.md says what each system does
and where that comes from. What is not a decision lives here: the stack whose per-layer costs it pays
(`configs/hardware/library/software.yaml`), whether its host copies are pinned or pageable, whether each
copy also writes its victim back over the link (mixtral-offloading's swap), and how it sizes its cache.
A case's `system_args` are checked against `System.args`; the policy-level ones reach the policy object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moecxl.runtime.policies import PolicyError, get_policy


class SystemsError(ValueError):
    """An unknown system or argument; the message lists the known ones."""


@dataclass(frozen=True)
class System:
    """One published system: its policy, stack, host memory kind and arguments (name -> default).

    `policy_args`: the arguments that are fields of the policy object; the rest are the deployment's.
    `fixed_cache`: the system sizes its cache itself (experts_per_layer x L) instead of taking the
    budget left on the GPU. `write_back`: every copy also moves an evicted expert back to the host over
    the same link before the next copy (one CUDA stream). `fits_all`: the system needs every expert on
    the GPU (gpu_only). `offloads_dense`: the system streams the non-expert weights of an offloaded layer
    too (Accelerate's whole-layer hook, ZeRO-3's partitioned attention), synchronously, each visit.
    `stages_layer`: copies of a whole layer may be in flight at once (prefetch-all)."""

    name: str
    policy: str
    stack: str
    pinned: bool = True
    args: dict = field(default_factory=dict)
    policy_args: tuple[str, ...] = ()
    fixed_cache: bool = False
    write_back: bool = False
    fits_all: bool = False
    offloads_dense: bool = False
    stages_layer: bool = False
    description: str = ""


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in [
        System(
            "accelerate",
            "accelerate",
            "hf-eager",
            pinned=False,
            args={"pinned": False, "resident_layers": "auto"},
            policy_args=("resident_layers",),
            offloads_dense=True,
            description="Hugging Face Accelerate (device_map): whole decoder layers on the GPU while they fit "
            "(resident_layers 'auto'), the rest copied in whole, synchronously, when the layer runs, "
            "tensor by tensor from pageable host memory, and dropped after",
        ),
        System(
            "deepspeed_zero",
            "deepspeed_zero",
            "deepspeed",
            pinned=False,
            args={"pinned": False},
            offloads_dense=True,
            description="ZeRO-3 parameter offload (ZeRO-Inference / DeepSpeed-MII): each submodule's parameters "
            "fetched when it is called (a MoE block calls only its routed experts) and released after; the "
            "prefetcher replays the recorded module order, which changes with routing",
        ),
        System(
            "mixtral_offloading",
            "mixtral_offloading",
            "mixtral-offloading",
            args={"experts_per_layer": 2, "speculative": False, "stack": "mixtral-offloading"},
            policy_args=("experts_per_layer", "speculative"),
            fixed_cache=True,
            write_back=True,
            description="Eliseev & Mazur: per-layer LRU of k experts (k = 0: none cached, every routed expert "
            "copied into a staging buffer), each load swapping the victim back to pinned host memory on "
            "the same stream; optional speculative loading of the next layer's guessed experts",
        ),
        System(
            "moe_infinity",
            "moe_infinity",
            "moe-infinity",
            description="MoE-Infinity: request-level expert activation matrices matched to past ones, "
            "activation-aware prefetch of the coming layers and activation-aware eviction, pinned copies",
        ),
        System(
            "fiddler",
            "fiddler",
            "fiddler",
            description="Fiddler: experts on the GPU by popularity up to its memory, never moved; a missing "
            "expert is computed on the CPU where it lives unless enough tokens route to it that a copy "
            "is cheaper (its cost model: 7 per token on the CPU against 70 for a copy)",
        ),
        System(
            "prefetch_all",
            "prefetch_all",
            "hf-eager",
            stages_layer=True,
            description="SE-MoE-style: all experts of the next MoE layer prefetched while the current one computes",
        ),
        System(
            "pregated",
            "pregated",
            "pregated",
            description="Pre-gated MoE: layer l+1's experts chosen by a pre-gate on layer l's input and copied "
            "while layer l computes; only they are resident besides the current layer's",
        ),
        System(
            "moe_ondemand",
            "deepspeed_zero",
            "hf-eager",
            description="Pre-gated MoE's MoE-OnDemand baseline: the routed experts copied after the gate and "
            "released after use (ZeRO-3's decisions without its hooks or pageable copies)",
        ),
        System(
            "gpu_only",
            "gpu_only",
            "hf-eager",
            fits_all=True,
            description="every expert resident on the GPU (the upper bound where it fits)",
        ),
        *(
            System(p, p, "hf-eager", description=f"moecxl's `{p}` policy")
            for p in ("on_demand", "lru", "lfu", "pregate", "hobbit", "oracle", "moecxl", "moecxl_nd")
        ),
    ]
}
# Every system: run on another stack (the implementation a publication measured it in), from another kind of
# host memory, or with a cache of `expert_slots` experts set by the publication instead of the GPU's room.
COMMON_ARGS = {"stack": None, "pinned": None, "expert_slots": None}


def system_of(name: str) -> System:
    if name not in SYSTEMS:
        raise SystemsError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
    return SYSTEMS[name]


def resolve_args(system: System, given: dict | None) -> dict:
    """The system's arguments with the case's applied; an unknown one names the known ones."""
    given = dict(given or {})
    known = {**COMMON_ARGS, **system.args}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise SystemsError(f"system {system.name!r} has no argument(s) {unknown}; known: {sorted(known)}")
    out = {k: v for k, v in {**known, **given}.items()}
    if out["stack"] is None:
        out["stack"] = system.stack
    if out["pinned"] is None:
        out["pinned"] = system.pinned
    if not isinstance(out["pinned"], bool):
        raise SystemsError(f"system {system.name!r}: pinned must be true or false, got {out['pinned']!r}")
    slots = out["expert_slots"]
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise SystemsError(f"system {system.name!r}: expert_slots must be a positive integer, got {slots!r}")
    return out


def policy_for(system: System, args: dict):
    """The policy object that makes the system's decisions, its policy-level arguments applied."""
    try:
        policy = get_policy(system.policy)
    except PolicyError as e:
        raise SystemsError(f"system {system.name!r}: its policy is not available: {e}") from e
    kw = {k: args[k] for k in system.policy_args if k in args}
    if not kw:
        return policy
    try:
        return replace(policy, **kw)
    except TypeError as e:
        raise SystemsError(
            f"system {system.name!r}: policy {policy.name!r} does not take {sorted(kw)}: {e}"
        ) from e
