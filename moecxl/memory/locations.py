"""Where expert copies live, as accounts: homes, whole copies, stripes and bytes used per tier.

`memory.store.HostStore` (which also holds the bytes) and the simulator's `runtime.locations.VirtualStore`
(accounts only) share these calls, so the decision core reads and changes locations the same way on both.
"""

from __future__ import annotations

ALIGN_BYTES = 4096  # copies start on page boundaries: aligned for pinned_host aliasing and O_DIRECT


class StoreError(ValueError):
    """A bad placement, a full tier, or a corrupted copy; the message names the expert and tier."""


def pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages: what a chunk occupies on its tier."""
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


class Locations:
    """Homes, copies (key -> tier -> what holds it) and stripes of every expert, and bytes used per tier."""

    def __init__(self, hardware, slot_bytes: int):
        self.hardware = hardware
        self.slot_bytes = int(slot_bytes)
        self.used_bytes: dict[str, int] = {}
        self.home_of: dict[tuple[int, int], str] = {}
        self.stripes: dict = {}  # key -> runtime.striping.StripeSet
        self.node_report: dict[str, dict] = {}
        self._copies: dict[tuple[int, int], dict[str, object]] = {}

    def check_room(self, key, tier_name: str, nbytes: int, what: str = "expert") -> None:
        """Refuse an unknown tier, or one without `nbytes` free, naming the expert and the tier."""
        if tier_name not in self.hardware.tier_names:
            raise StoreError(
                f"expert {key}: unknown tier {tier_name!r}; tiers: {', '.join(self.hardware.tier_names)}"
            )
        used, cap = self.used_bytes.get(tier_name, 0), self.hardware.tier(tier_name).capacity_bytes
        if used + nbytes > cap:
            raise StoreError(
                f"tier {tier_name!r} is full: {used} of {cap} bytes used, {what} {key} needs {nbytes} more"
            )

    def drop_stripe(self, key) -> None:
        stripe = self.stripes.pop(key, None)
        if stripe is not None:
            for t, n in zip(stripe.tiers, stripe.chunk_bytes):
                self.used_bytes[t] -= pages(n)

    def stripe_of(self, key):
        return self.stripes.get(key)

    def tiers_of(self, key) -> tuple[str, ...]:
        return tuple(self._copies.get(key, {}))

    def only_copy(self, key) -> str | None:
        """The tier of `key`'s one whole copy, or None when it has several (or none): the core's fast
        path for the common case, without building `tiers_of`'s tuple."""
        copies = self._copies.get(key)
        if copies is None or len(copies) != 1:
            return None
        (tier,) = copies
        return tier

    def home(self, key) -> str:
        return self.home_of[key]

    def set_home(self, key, tier_name: str) -> None:
        if tier_name not in self._copies.get(key, {}):
            raise StoreError(f"expert {key} has no copy on {tier_name!r} to make its home")
        self.home_of[key] = tier_name

    def experts_on(self, tier: str) -> list[tuple[int, int]]:
        return [k for k, c in self._copies.items() if tier in c]

    def homed_on(self, tier: str) -> list[tuple[int, int]]:
        return [k for k, t in self.home_of.items() if t == tier]
