"""Where expert copies live, as bookkeeping only: the simulator's stand-in for `memory.store.HostStore`.

The decision core reads and changes locations through the same calls on both (homes, whole copies,
stripes, bytes used per tier); the host store also holds the bytes, this one only the accounts.
"""

from __future__ import annotations

from moecxl.memory.store import ALIGN_BYTES, StoreError


class VirtualStore:
    """Homes, copies and stripes of every expert, without the bytes (`HostStore`'s location calls)."""

    def __init__(self, hardware, placement: dict, slot_bytes: int):
        self.hardware = hardware
        self.slot_bytes = int(slot_bytes)
        self.used_bytes: dict[str, int] = {}
        self.home_of: dict = {}
        self.stripes: dict = {}
        self.node_report: dict = {}
        self._copies: dict = {}
        for key, tier in sorted(placement.items()):
            self.add_copy(key, tier)
            self.home_of[key] = tier

    def add_copy(self, key, tier_name: str, data=None) -> int:
        if tier_name not in self.hardware.tier_names:
            raise StoreError(
                f"expert {key}: unknown tier {tier_name!r}; tiers: {', '.join(self.hardware.tier_names)}"
            )
        copies = self._copies.setdefault(key, {})
        if tier_name in copies:
            return 0
        used, cap = self.used_bytes.get(tier_name, 0), self.hardware.tier(tier_name).capacity_bytes
        if used + self.slot_bytes > cap:
            raise StoreError(
                f"tier {tier_name!r} is full: {used} of {cap} bytes used, expert {key} needs {self.slot_bytes} more"
            )
        copies[tier_name] = True
        self.used_bytes[tier_name] = self.used_bytes.get(tier_name, 0) + self.slot_bytes
        return self.slot_bytes

    def drop_copy(self, key, tier_name: str) -> None:
        if self._copies.get(key, {}).pop(tier_name, None) is not None:
            self.used_bytes[tier_name] -= self.slot_bytes

    def add_stripe(self, key, stripe, data=None) -> int:
        self.drop_stripe(key)
        for t, n in zip(stripe.tiers, stripe.chunk_bytes):
            self.used_bytes[t] = self.used_bytes.get(t, 0) + -(-n // ALIGN_BYTES) * ALIGN_BYTES
        self.stripes[key] = stripe
        return stripe.nbytes

    def drop_stripe(self, key) -> None:
        stripe = self.stripes.pop(key, None)
        if stripe is not None:
            for t, n in zip(stripe.tiers, stripe.chunk_bytes):
                self.used_bytes[t] -= -(-n // ALIGN_BYTES) * ALIGN_BYTES

    def stripe_of(self, key):
        return self.stripes.get(key)

    def tiers_of(self, key) -> tuple[str, ...]:
        return tuple(self._copies.get(key, {}))

    def only_copy(self, key) -> str | None:
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

    def experts_on(self, tier: str) -> list:
        return [k for k, c in self._copies.items() if tier in c]

    def homed_on(self, tier: str) -> list:
        return [k for k, t in self.home_of.items() if t == tier]

    def source(self, key, low_precision: bool = False, tier: str | None = None):
        return None  # no bytes here: a migration books time, nothing to read

    def close(self) -> None:
        pass
