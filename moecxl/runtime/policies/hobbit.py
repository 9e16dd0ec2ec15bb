"""HOBBIT's token-level idea only (not the HOBBIT system: no layer-level adaptive prefetch, no
multidimensional cache): on a miss of an expert whose routing weight is low (below the run's `lowp_threshold`), an
int8 copy instead of the full-precision one (inexact by design); LRU cache."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "hobbit",
    evict="lru",
    exact=False,
    low_precision_on_miss=True,
    description="HOBBIT-style mixed precision for misses: an int8 copy of a low-weight expert (inexact); "
    "LRU cache",
)
