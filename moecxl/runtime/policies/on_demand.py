"""DeepSpeed-MoE-style offloading at expert granularity: fetch each expert when a layer needs it, keep
the cache in arrival order. No prefetch."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "on_demand",
    evict="fifo",
    description="DeepSpeed-MoE-style offloading: fetch each expert when a layer needs it",
)
