"""One least-recently-used expert cache over all layers, fetch on miss. (mixtral-offloading's cache is
per layer, k experts each: that system is `mixtral_offloading`.)"""

from moecxl.runtime.policies.base import Policy

POLICY = Policy("lru", evict="lru", description="one global LRU expert cache over all layers, fetch on miss")
