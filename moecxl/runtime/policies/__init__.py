"""Offloading policies as objects: one module each, registered here by name.

A policy implements `base.PolicyProtocol` (usually as a `base.Policy`: an eviction rule from
`eviction.py`, a prefetch source from `sources.py`, and traits). To add one:

- in the package: a module `moecxl/runtime/policies/NAME.py` defining `POLICY`, and its module name in
  `_BUILTIN` below;
- outside it: `register(policy)` at run time, or an entry point in your package's metadata
  (`[project.entry-points."moecxl.policies"] NAME = "your.module:POLICY"`), found by name on first use;
- or hand the object itself to `OffloadEngine(policy=...)` / `SimConfig(policy=...)`.

Names (`PolicySpec` strings) remain only in configs and CLIs.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from moecxl.runtime.policies.base import (
    Policy,
    PolicyError,
    PolicyProtocol,
    check_policy,
)
from moecxl.runtime.policies.eviction import (
    RULES,
    EntryStats,
    EvictionRule,
    NextUse,
    choose_victims,
    eviction_score,
    rule_of,
)
from moecxl.runtime.policies.reuse import (
    PREDICTION_REACH,
    REUSE_ALPHAS,
    SKIPPED_ROUNDS,
    Reuse,
    expected_reuse_distance,
    reuse_distance_S,
)
from moecxl.runtime.policies.sources import (
    SOURCES,
    PrefetchSource,
    eam_match,
    eam_probs,
    pregate_vote_probs,
    source_of,
    topk_candidates,
)

PolicySpec = Policy  # the old name of the record

ENTRY_POINT_GROUP = "moecxl.policies"

_BUILTIN = (
    "on_demand",
    "lru",
    "lfu",
    "pregate",
    "moe_infinity",
    "hobbit",
    "oracle",
    "moecxl",
    "moecxl_nd",
    "moecxl_host",
    # the published systems, as they behave (docs/systems.md)
    "accelerate",
    "deepspeed_zero",
    "mixtral_offloading",
    "fiddler",
    "prefetch_all",
    "pregated",
    "gpu_only",
)

POLICIES: dict[str, PolicyProtocol] = {}


def register(policy, *, replace: bool = False):
    """Make `policy` known by its name (to configs, CLIs, `get_policy`); refuses a non-policy or a clash."""
    check_policy(policy)
    if policy.name in POLICIES and not replace and POLICIES[policy.name] is not policy:
        raise PolicyError(f"a policy named {policy.name!r} is already registered (pass replace=True)")
    POLICIES[policy.name] = policy
    return policy


for _name in _BUILTIN:
    register(importlib.import_module(f"{__name__}.{_name}").POLICY)


def _from_entry_point(name: str):
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return register(ep.load())
            except (ImportError, AttributeError) as e:
                raise PolicyError(f"policy {name!r}: entry point {ep.value!r} failed to load: {e}") from e
    return None


def get_policy(policy) -> PolicyProtocol:
    """The policy of a name (registered, or an installed entry point), or the object itself, checked."""
    if not isinstance(policy, str):
        check_policy(policy)
        return policy
    if policy in POLICIES:
        return POLICIES[policy]
    found = _from_entry_point(policy)
    if found is None:
        raise PolicyError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    return found


__all__ = [
    "ENTRY_POINT_GROUP",
    "POLICIES",
    "PREDICTION_REACH",
    "REUSE_ALPHAS",
    "RULES",
    "SKIPPED_ROUNDS",
    "SOURCES",
    "EntryStats",
    "EvictionRule",
    "NextUse",
    "Policy",
    "PolicyError",
    "PolicyProtocol",
    "PolicySpec",
    "PrefetchSource",
    "Reuse",
    "check_policy",
    "choose_victims",
    "eam_match",
    "eam_probs",
    "eviction_score",
    "expected_reuse_distance",
    "get_policy",
    "pregate_vote_probs",
    "register",
    "reuse_distance_S",
    "rule_of",
    "source_of",
    "topk_candidates",
]
