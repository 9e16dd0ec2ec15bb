"""Pre-gating as AdapMoE does it: layer l+1's router applied to layer l's hidden state guesses the experts
to prefetch one layer ahead; one global LRU cache. A moecxl baseline, not a published system: Pre-gated
MoE (a trained pre-gate that *is* the next routing, memory-minimal) is `pregated`, and mixtral-
offloading's speculative loading is `mixtral_offloading(speculative=True)`."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "pregate",
    evict="lru",
    prefetch="pregate",
    horizon=1,
    description="pre-gating (AdapMoE-style guess: layer l+1's router on layer l's hidden state), LRU cache "
    "(Pre-gated MoE itself is `pregated`)",
)
