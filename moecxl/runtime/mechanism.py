"""What the decision core asks of whoever carries out its actions: the `Mechanism` protocol.

The engine implements it with real copies (`memory.transfer`) and slot arrays; the simulator with
bookings on a `LinkClock` and a simulated clock. The core makes every choice; a mechanism only moves
bytes (or books them), tells the time and reports how long it was blocked.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class CoreError(ValueError):
    """The core cannot act as asked (nothing evictable, a working set above the cache); names the value."""


class CopyFailed(RuntimeError):
    """A copy could not land (its source went offline mid-copy); the core fetches it again elsewhere."""


@runtime_checkable
class Copy(Protocol):
    """A copy in flight: where it reads from and when the clock expects it to land."""

    key: tuple[int, int]
    low_precision: bool
    expected_done_s: float

    @property
    def tiers(self) -> tuple[str, ...]: ...

    def bytes_by_tier(self) -> dict[str, int]: ...

    def done(self) -> bool: ...


@runtime_checkable
class Mechanism(Protocol):
    """Carries out the core's actions; decides nothing."""

    clock: object  # memory.transfer.LinkClock: the links' bookings, read by the core's estimates
    books_host_reads: bool  # host reads are booked on the clock (emulated or simulated time)
    fetch_overhead_s: float  # measured per fetch beyond the link (issue + install); 0 when simulated
    install_overhead_s: float
    host_overhead_s: float  # measured host compute beyond the modelled time, per expert

    def now_s(self) -> float: ...

    def blocked_s(self) -> float:
        """Seconds blocked so far (waiting for copies, computing on the host): stall = its increase."""
        ...

    def layer_s(self, phase: str) -> float | None:
        """Compute per layer visit (measured or modelled); None until known."""
        ...

    def submit(self, key, plan, low_precision: bool, stripe, batched: bool = False) -> Copy:
        """Start one copy as planned. `batched` (whole, unstriped copies): it joins the open batch of
        its tier, booked as one transfer with it (the fixed cost paid once) and sent at `flush_batches`;
        the batch's copies all complete at its done time."""
        ...

    def flush_batches(self) -> None:
        """Send the open batches (one transfer per tier); the core calls it before time moves on."""
        ...

    def land(self, key, copy: Copy, slot: int) -> None:
        """Block until `copy` is there and map it into `slot` (raises CopyFailed)."""
        ...

    def staged(self) -> int:
        """Landed copies still holding staging (not yet written into the cache)."""
        ...

    def before_issue(self, n_inflight: int) -> None:
        """Make staging room for one more copy when landed copies hold it."""
        ...

    def host_compute(self, layer: int, jobs, until_s: float) -> None:
        """Compute `jobs` ((key, tier, tokens), in order) where they live; done at `until_s` (booked)."""
        ...

    def reserve_host_read(self, tier: str, at_s: float) -> float:
        """Book the host reading one expert from `tier` at `at_s`; returns when the read can start."""
        ...

    def hold_device(self, tier: str, now_s: float) -> float:
        """Book host-side traffic of one expert on a tier (migration); returns when it is done."""
        ...


def check_mechanism(mech) -> None:
    """A mechanism missing a protocol member is refused by name (not at its first use, mid-run)."""
    missing = [
        name
        for name in (*Mechanism.__annotations__, *(n for n in vars(Mechanism) if not n.startswith("_")))
        if not hasattr(mech, name)
    ]
    if missing:
        raise TypeError(
            f"{type(mech).__name__} is not a Mechanism: missing {', '.join(sorted(set(missing)))}"
        )
