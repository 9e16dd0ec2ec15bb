"""The cost-benefit transfer gate: is a prefetch worth its bytes? (pure; engine and simulator share it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateInputs:
    """Seconds and probabilities for one candidate prefetch (expert, layers ahead)."""

    p_use: float  # probability the expert is needed when its layer runs
    lead_s: float  # time until its layer runs
    wait_s: float  # when this prefetch would complete if issued now (queue included)
    miss_s: float  # stall if it is instead fetched on demand at need time
    link_busy_s: float  # how long this copy occupies its link
    demand_pressure: float  # chance a demand fetch queues behind it (recent miss rate on the link)
    victim_p: float = 0.0  # probability the expert it evicts is needed soon
    victim_miss_s: float = 0.0  # stall if that victim is then missed


def expected_saving_s(g: GateInputs) -> float:
    """p × the stall this prefetch removes: all of it if it lands in time, less the lateness if not."""
    late_s = max(0.0, g.wait_s - g.lead_s)
    return g.p_use * max(0.0, g.miss_s - late_s)


def expected_cost_s(g: GateInputs) -> float:
    """Link occupancy that demand fetches may queue behind, plus the expected stall of the victim."""
    return g.demand_pressure * g.link_busy_s + g.victim_p * g.victim_miss_s


def should_prefetch(g: GateInputs) -> bool:
    return expected_saving_s(g) > expected_cost_s(g)
