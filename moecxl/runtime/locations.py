"""Where expert copies live, as bookkeeping only: the simulator's stand-in for `memory.store.HostStore`.

The decision core reads and changes locations through the same calls on both (`memory.locations`);
the host store also holds the bytes, this one only the accounts.
"""

from __future__ import annotations

from moecxl.memory.locations import Locations, pages


class VirtualStore(Locations):
    """Homes, copies and stripes of every expert, without the bytes (`HostStore`'s location calls)."""

    def __init__(self, hardware, placement: dict, slot_bytes: int):
        super().__init__(hardware, slot_bytes)
        for key, tier in sorted(placement.items()):
            self.add_copy(key, tier)
            self.home_of[key] = tier

    def add_copy(self, key, tier_name: str, data=None) -> int:
        if tier_name in self._copies.get(key, {}):
            return 0
        self.check_room(key, tier_name, self.slot_bytes)
        self._copies.setdefault(key, {})[tier_name] = True
        self.used_bytes[tier_name] = self.used_bytes.get(tier_name, 0) + self.slot_bytes
        return self.slot_bytes

    def drop_copy(self, key, tier_name: str) -> None:
        if self._copies.get(key, {}).pop(tier_name, None) is not None:
            self.used_bytes[tier_name] -= self.slot_bytes

    def add_stripe(self, key, stripe, data=None) -> int:
        self.drop_stripe(key)
        for t, n in zip(stripe.tiers, stripe.chunk_bytes):
            self.used_bytes[t] = self.used_bytes.get(t, 0) + pages(n)
        self.stripes[key] = stripe
        return stripe.nbytes

    def source(self, key, low_precision: bool = False, tier: str | None = None):
        return None  # no bytes here: a migration books time, nothing to read

    def close(self) -> None:
        pass
