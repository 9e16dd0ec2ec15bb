"""Copies into the CPU device land in reused, pre-faulted staging buffers (memory.transfer.Staging)."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moecxl.memory.store import HostStore
from moecxl.memory.tiers import Hardware
from moecxl.memory.transfer import Staging, TransferEngine, host_device

DEV = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _expert(seed: int, n: int = 1 << 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(ml_dtypes.bfloat16)


def test_a_buffer_is_reused_once_xla_lets_go_of_it():
    staging = Staging()
    x = staging.put(_expert(0), DEV)
    np.testing.assert_array_equal(np.asarray(x), _expert(0))
    ptr = x.unsafe_buffer_pointer()
    del x
    gc.collect()
    y = staging.put(_expert(1), DEV)
    assert y.unsafe_buffer_pointer() == ptr and staging.allocated == 1  # the same pages, faulted in once
    np.testing.assert_array_equal(np.asarray(y), _expert(1))


def test_a_held_copy_is_never_overwritten():
    staging = Staging()
    x = staging.put(_expert(0), DEV)
    total = jnp.sum(x.astype(jnp.float32))  # a computation reading it, perhaps still pending
    y = staging.put(_expert(1), DEV)
    assert staging.allocated == 2 and x.unsafe_buffer_pointer() != y.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(x), _expert(0))
    np.testing.assert_allclose(float(total), np.sum(_expert(0).astype(np.float64)), rtol=1e-3)


def test_a_buffer_waits_for_the_computation_reading_it():
    staging = Staging()
    x = staging.put(np.ones((512, 512), np.float32), DEV)
    y = jnp.sum(jnp.tanh(x @ x @ x))  # dispatched asynchronously; x dropped while it may still run
    del x
    gc.collect()
    if not y.is_ready():
        assert not staging._free.get(512 * 512 * 4)  # not back in the pool while XLA reads it
    y.block_until_ready()
    gc.collect()
    assert len(staging._free[512 * 512 * 4]) == 1


def test_transfers_deliver_the_stored_bytes(tiny_model):
    hw = Hardware.from_yaml("configs/hardware/cpu-local.yaml")
    keys = [(0, e) for e in range(3)]
    store = HostStore(tiny_model, hw, dict.fromkeys(keys, "dram"), low_precision=True)
    transfers = TransferEngine(store, hw, emulate=False)
    try:
        assert host_device(transfers.device_sharding)
        for _ in range(2):  # the second round reuses the first round's buffers
            for k in keys:
                got = transfers.submit(k, "dram").result()
                np.testing.assert_array_equal(
                    np.asarray(got).view(np.uint16), store.master(k).view(np.uint16)
                )
                q, s = transfers.submit(k, "dram", low_precision=True).result()
                np.testing.assert_array_equal(np.asarray(q), store.source(k, low_precision=True)[0])
                del got, q, s
                gc.collect()
        assert transfers.staging.allocated <= 4
    finally:
        transfers.close()
        store.close()
