"""The limit: future routing known from a trace; prefetch the next visits' experts, evict by Belady."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "oracle",
    evict="belady",
    prefetch="oracle",
    horizon=4,
    description="the limit: future routing known from a trace, Belady eviction",
)
