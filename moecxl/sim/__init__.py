"""Trace-driven simulation of expert offloading at paper scale (every figure labelled simulated).

from moecxl.sim import simulate, SimConfig, load_shape, requests_from_trace
"""

from moecxl.sim.costmodel import ModelShape, load_shape, shape_of
from moecxl.sim.simulate import SimConfig, SimError, SimResult, simulate
from moecxl.sim.workload import (
    WorkloadError,
    requests_from_arrays,
    requests_from_generate,
    requests_from_trace,
)

__all__ = [
    "ModelShape",
    "load_shape",
    "shape_of",
    "SimConfig",
    "SimError",
    "SimResult",
    "simulate",
    "WorkloadError",
    "requests_from_arrays",
    "requests_from_generate",
    "requests_from_trace",
]
