"""Pre-gated MoE / AdapMoE: layer l+1's router applied to layer l's hidden state names the experts to
prefetch one layer ahead; LRU cache. (Also mixtral-offloading's speculative loading, without its
per-layer cache.)"""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "pregate",
    evict="lru",
    prefetch="pregate",
    horizon=1,
    description="Pre-gated MoE / AdapMoE: layer l+1's router on layer l's hidden state, LRU cache",
)
