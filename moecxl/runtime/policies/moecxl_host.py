"""moecxl with every miss computed on the host (Fiddler-style, never fetched on demand; prefetches
still copy): the host-compute-only side of the three-way comparison."""

from dataclasses import replace

from moecxl.runtime.policies.moecxl import POLICY as MOECXL

POLICY = replace(
    MOECXL,
    name="moecxl_host",
    exact=False,
    host_compute=True,
    host_only=True,
    description="moecxl with every miss computed on the host (Fiddler-style, never fetched on demand; "
    "prefetches still copy): the host-compute-only side of the three-way comparison",
)
