"""moecxl with the three-way miss decision: fetch the expert, compute it on the host where it lives,
or (within the quality budget) fetch a low-precision copy; whichever the cost model finishes first,
net of what a cached copy saves later (`gate.miss_decision`)."""

from dataclasses import replace

from moecxl.runtime.policies.moecxl import POLICY as MOECXL

POLICY = replace(
    MOECXL,
    name="moecxl_nd",
    exact=False,
    host_compute=True,
    description="moecxl + the three-way miss decision: fetch, compute on the host where the expert lives, "
    "or (within the quality budget) a low-precision copy; float32-close (1e-5), not bit-identical, "
    "because host-computed experts are summed separately",
)
