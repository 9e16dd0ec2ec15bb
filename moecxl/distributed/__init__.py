"""Scale-out on JAX's distributed engine: expert parallelism over a `(data, expert)` mesh
(`jax.sharding` + `shard_map` + all-to-all), a tier runtime per host with rolled-up metrics,
multi-process start-up with bounded failure, and data-parallel helpers for traces and training."""

from moecxl.distributed.data_parallel import (
    data_mesh,
    data_parallel,
    dp_routing,
    dp_value_and_grad,
    make_dp_train_step,
    replicate_tree,
    shard_batch,
)
from moecxl.distributed.expert_parallel import (
    DATA,
    EXPERT,
    EPProvider,
    ExpertParallel,
    MeshError,
    check_mesh,
    ep_expert_step,
    ep_forward,
    make_mesh,
    shard_model,
)
from moecxl.distributed.host_runtime import (
    OffloadedExpertParallel,
    expert_subset,
    host_metrics,
    owned_experts,
    rollup,
    shard_owners,
)
from moecxl.distributed.multihost import DistributedError, Watchdog, allgather_json, free_port, initialize

__all__ = [
    "DATA",
    "EXPERT",
    "DistributedError",
    "EPProvider",
    "ExpertParallel",
    "expert_subset",
    "MeshError",
    "OffloadedExpertParallel",
    "Watchdog",
    "allgather_json",
    "check_mesh",
    "data_mesh",
    "data_parallel",
    "dp_routing",
    "dp_value_and_grad",
    "ep_expert_step",
    "ep_forward",
    "free_port",
    "host_metrics",
    "initialize",
    "make_dp_train_step",
    "make_mesh",
    "owned_experts",
    "replicate_tree",
    "rollup",
    "shard_batch",
    "shard_model",
    "shard_owners",
]
