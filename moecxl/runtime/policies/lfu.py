"""Least-frequently-used expert cache (ties: least recently used), fetch on miss."""

from moecxl.runtime.policies.base import Policy

POLICY = Policy("lfu", evict="lfu", description="least-frequently-used expert cache, fetch on miss")
