"""Data parallelism over the mesh's `data` axis: batch sharding, a per-device map for trace collection,
and training steps whose gradients are the global batch's (explicit `pmean` / `psum` inside `shard_map`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moecxl.distributed.expert_parallel import DATA, MeshError, make_mesh, to_global


def data_mesh(n: int = 0) -> Mesh:
    """A `(data=n, expert=1)` mesh over this process's first `n` devices (0: all of them)."""
    devs = jax.local_devices()
    n = n or len(devs)
    if not 1 <= n <= len(devs):
        raise MeshError(
            f"data parallelism over {n} devices: this process has {len(devs)} {jax.default_backend()} "
            f"device(s) (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts)"
        )
    return make_mesh(n, 1, devices=devs[:n])


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


def data_parallel(fn, mesh: Mesh, batch_args: tuple[int, ...], axis: str = DATA):
    """`fn(*args)` jitted as one SPMD program in which every device of `axis` runs `fn` on its share.

    Arguments at positions `batch_args` are split over `axis` along dim 0 (numpy goes straight to its
    shards; B must divide evenly); the others (parameter pytrees) must be replicated on `mesh`
    (`replicate_tree`, once). Every output is split like the batch. No collective: each device computes
    what one device computes on its rows, so outputs equal the single-device call up to float rounding.
    """

    def body(*args):
        specs = tuple(P(axis) if i in batch_args else P() for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis))(*args)

    step = jax.jit(body)

    def call(*args):
        return step(*(shard_batch(a, mesh, axis) if i in batch_args else a for i, a in enumerate(args)))

    return call


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


def dp_value_and_grad(sum_count_fn, axis: str = DATA):
    """For use inside `shard_map`: `f(params, *batch) -> (loss, grads)` of the global-batch mean.

    `sum_count_fn(params, *batch) -> (sum, count)` over the local shard (a masked loss: count = valid
    items, independent of params). Averaging per-shard means (`make_dp_train_step`) is exact only when
    every shard holds as many valid items; here loss = psum(sum) / psum(count) and grads = psum(grad of
    sum) / psum(count), which equal the single-device sum / max(count, 1) on the whole batch.
    """

    def f(params, *batch):
        # Per-device copies, as in make_dp_train_step: the psum below is the one sum over shards.
        local = jax.tree.map(lambda p: jax.lax.pcast(p, axis, to="varying"), params)
        (s, n), g = jax.value_and_grad(sum_count_fn, has_aux=True)(local, *batch)
        n = jnp.maximum(jax.lax.psum(n, axis), 1.0)
        return jax.lax.psum(s, axis) / n, jax.tree.map(lambda x: jax.lax.psum(x, axis) / n, g)

    return f
