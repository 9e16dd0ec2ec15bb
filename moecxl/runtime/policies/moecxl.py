"""moecxl: multi-layer prediction (pre-gating until a learned predictor is given) through the
cost-benefit gate, and prediction-aware eviction (the largest expected reuse distance first)."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy(
    "moecxl",
    evict="predicted",
    prefetch="pregate",
    horizon=2,
    gate=True,
    description="moecxl: multi-layer prediction (pre-gate until a learned predictor is given) with the "
    "cost-benefit gate and prediction-aware eviction",
)
