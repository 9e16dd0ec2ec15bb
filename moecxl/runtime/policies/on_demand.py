"""On-demand offloading at expert granularity: fetch each expert when a layer needs it, keep
the cache in arrival order. No prefetch."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "on_demand",
    evict="fifo",
    description="on-demand: fetch each expert when a layer needs it into a FIFO cache of the budget (not DeepSpeed: that system is `deepspeed_zero`)",
)
