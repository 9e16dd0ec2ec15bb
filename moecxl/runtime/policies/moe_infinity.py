"""MoE-Infinity: the request's expert activation matrix (EAM), matched by cosine similarity to past
requests' matrices, drives prefetch (three layers ahead) and eviction (lowest matched activation)."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "moe_infinity",
    evict="activation",
    prefetch="eam",
    horizon=3,
    description="MoE-Infinity: request activation matrix matched to past requests by cosine similarity; "
    "prefetch and evict by matched activation ratio",
)
