"""Data parallelism over the mesh's `data` axis: batch sharding, a routing forward for traces, and a
training step whose gradients are averaged across `data` (explicit `pmean` inside `shard_map`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moecxl.distributed.expert_parallel import DATA, MeshError, to_global


def shard_batch(x, mesh: Mesh, axis: str = DATA) -> jax.Array:
    """`x` [B, ...] with B split over `axis`; B must divide evenly (the error names B and the axis)."""
    x = np.asarray(x)
    n = mesh.shape[axis]
    if x.shape[0] % n:
        raise MeshError(f"batch B={x.shape[0]} is not divisible by the mesh's {axis!r} axis size {n}")
    return to_global(x, mesh, P(axis))


def replicate_tree(tree, mesh: Mesh):
    """Every array of a pytree (params, optimizer state) replicated on `mesh`."""
    return jax.tree.map(
        lambda a: to_global(a, mesh, P()) if isinstance(a, (jax.Array, np.ndarray)) else a, tree
    )


@functools.lru_cache(maxsize=8)
def _routing_jit(graphdef, mesh: Mesh):
    def routing(state, ids_BT, mask_BT):
        out = nnx.merge(graphdef, state)(ids_BT, mask_BT)
        st = functools.partial(jnp.stack, axis=2)
        return st(out.expert_ids), st(out.expert_weights).astype(jnp.float32), st(out.router_logits)

    batch = NamedSharding(mesh, P(DATA))
    return jax.jit(routing, out_shardings=(batch, batch, batch))


def dp_routing(model, ids_BT, mask_BT, mesh: Mesh):
    """Routing of every MoE layer for a batch split over `data` (trace collection, one SPMD program).

    Returns (ids [B, T, L, K], weights [B, T, L, K], router logits [B, T, L, E]), sharded over `data`.
    """
    graphdef, state = nnx.split(model)
    state = replicate_tree(state, mesh)
    return _routing_jit(graphdef, mesh)(state, shard_batch(ids_BT, mesh), shard_batch(mask_BT, mesh))


def make_dp_train_step(loss_fn, opt, mesh: Mesh, axis: str = DATA):
    """`step(params, opt_state, batch) -> (params, opt_state, loss)` with the batch split over `axis`.

    `loss_fn(params, batch)` is a mean over the local batch; gradients and loss are averaged over
    `axis` with `pmean`, so with equal shards the step equals the single-device step on the whole batch.
    Params and optimizer state stay replicated (`replicate_tree`); the batch comes from `shard_batch`.
    """

    def local(params, opt_state, batch):
        # Differentiate per-device copies (varying over `axis`): each device's grads are its own
        # shard's, and the average below is the one collective. (Differentiating the replicated
        # params directly would make shard_map insert a psum: a sum, not a mean.)
        local_params = jax.tree.map(lambda p: jax.lax.pcast(p, axis, to="varying"), params)
        loss, grads = jax.value_and_grad(loss_fn)(local_params, batch)
        grads = jax.lax.pmean(grads, axis)
        loss = jax.lax.pmean(loss, axis)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P(), P()))
    return jax.jit(step)
