"""Scale-out: expert parallelism on 8 forced CPU devices and across 2 processes, bounded failures;
data-parallel trace collection and predictor training on 8 forced devices against one device (the
multi-process and data-parallel runs are in the slow set).

Every run is a subprocess (tests/distributed_worker.py) with a hard timeout, so forced device counts
and `jax.distributed` state never leak into other tests; they start together and the tests wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moecxl.distributed import rollup
from moecxl.distributed.multihost import free_port

ROOT = Path(__file__).resolve().parents[1]
HARD_TIMEOUT_S = 300  # the machine is shared; a healthy run takes a fraction of this
TOL = 1e-5


class Run:
    """One worker subprocess: started now, waited on (with its hard timeout) when a test asks."""

    def __init__(self, args, out: Path):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.out = out
        self.err_path = out.with_suffix(".err")
        self.t0 = time.monotonic()
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.distributed_worker", *map(str, args)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.ended_s = None

    def wait(self, timeout_s: float = HARD_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"worker {self.proc.args[3:]} exceeded {timeout_s} s; stderr tail:\n{self.stderr()[-3000:]}"
            )
        self.ended_s = self.ended_s or time.monotonic()
        return rc

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def result(self) -> dict:
        rc = self.wait()
        assert rc == 0, f"worker {self.proc.args[3:]} failed (rc {rc}):\n{self.stderr()[-3000:]}"
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    started = {
        "devices": Run(["devices", d / "devices.json"], d / "devices.json"),
    }
    yield started
    for r in started.values():
        r.kill()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two-process runs (slow set: five more JAX processes): a healthy pair, a pair whose process 1 is
    killed, and a process whose coordinator never answers."""
    d = tmp_path_factory.mktemp("hosts")
    port_ok, port_kill, port_dead = free_port(), free_port(), free_port()
    started = {
        "host0": Run(["host", port_ok, 0, 2, d / "h0.json", "--timeout", 120], d / "h0.json"),
        "host1": Run(["host", port_ok, 1, 2, d / "h1.json", "--timeout", 120], d / "h1.json"),
        "kill0": Run(["host", port_kill, 0, 2, d / "k0.json", "--timeout", 60, "--barriers"], d / "k0.json"),
        "kill1": Run(["host", port_kill, 1, 2, d / "k1.json", "--timeout", 60, "--barriers"], d / "k1.json"),
        # Nothing listens on port_dead: process 1 must give up on the coordinator with a clear error.
        "unreachable": Run(["host", port_dead, 1, 2, d / "u.json", "--timeout", 3], d / "u.json"),
    }
    yield started
    for r in started.values():
        r.kill()


@pytest.fixture(scope="module")
def devices(runs):
    return runs["devices"].result()


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """Data-parallel trace collection and predictor training on 8 devices (slow set: ~50 s of CPU)."""
    d = tmp_path_factory.mktemp("dp")
    run = Run(["dp", d / "dp.json", d / "dp"], d / "dp.json")
    try:
        yield run.result()
    finally:
        run.kill()


@pytest.mark.parametrize("mesh", ["1x8", "2x4", "4x2"])
def test_expert_parallel_generate_equals_single_device(devices, mesh):
    row = devices["meshes"][mesh]
    data, expert = map(int, mesh.split("x"))
    assert row["expert_shard_shape"][0] == 8 // expert  # each device holds E / X experts
    assert row["all_to_all"]["tokens_equal"], mesh
    assert row["all_to_all"]["logits_rel"] < TOL, (mesh, row)


def test_both_dispatches_equal_the_single_device_expert_step(devices):
    assert devices["dispatch"]["all_to_all"] < TOL and devices["dispatch"]["psum"] < TOL, devices["dispatch"]


def test_full_forward_data_and_expert_parallel(devices):
    fwd = devices["meshes"]["2x4"]["forward"]
    assert fwd["ids_equal"]
    assert fwd["last_logits_rel"] < TOL


def test_per_host_engine_under_expert_parallelism(devices):
    off = devices["offloaded"]
    assert off["tokens_equal"] and off["logits_rel"] < TOL
    assert off["owned"] == 8 and off["lookups"] > 0 and 0 <= off["hit_rate"] <= 1


def test_data_parallel_trace_forward_and_train_step(devices):
    r = devices["dp_routing"]
    assert r["ids_equal"] and r["weights_rel"] < TOL and "data" in r["sharding"]
    t = devices["dp_train"]
    assert abs(t["loss_dp"] - t["loss_single"]) <= 1e-5 * abs(t["loss_single"])
    assert t["params_max_abs"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("run", ["dp8", "resumed_dp8"])
def test_data_parallel_trace_collection_equals_single_device(dp, run):
    # dp8: the whole collection on 8 devices (batch 5 padded to 8); resumed_dp8: one shard written on one
    # device, the rest on 8 after an interruption.
    r = dp["traces"][run]
    assert r["same_rows"] and r["ids_equal"] and r["args_equal"], r
    assert r["data_parallel"] == [1, 8] and r["decode_rows"] > 0, r
    assert max(r["weights_rel"], r["logits_rel"], r["sketch_rel"]) < TOL, r


@pytest.mark.slow
def test_data_parallel_predictor_training_matches_single_device_losses(dp):
    # Batch 12 split over 8 devices (padded to 16 with masked windows), shards of unequal valid counts.
    one, eight = dp["predictor"]["1"], dp["predictor"]["8"]
    assert (one["data_parallel"], eight["data_parallel"]) == (1, 8) and len(one["train_loss"]) == 2
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(eight[key], one[key], rtol=TOL, err_msg=key)


@pytest.mark.slow
def test_data_parallel_beyond_the_devices_is_a_clear_error(dp):
    for msg in (dp["traces"]["too_many_devices"], dp["predictor"]["too_many_devices"]):
        assert "data parallelism over 9 devices: this process has 8 cpu device(s)" in msg, msg
        assert "xla_force_host_platform_device_count=9" in msg, msg


def test_mesh_not_dividing_experts_is_a_clear_error(devices):
    msg = devices["errors"]["mesh_not_dividing"]
    assert "E=8" in msg and "'expert' axis size 3" in msg
    assert "needs 9 devices, have 8" in devices["errors"]["mesh_too_big"]


@pytest.mark.slow
def test_two_processes_generate_the_single_process_tokens(hosts, devices):
    h0, h1 = hosts["host0"].result(), hosts["host1"].result()
    assert h0["devices"] == 4 and h0["local_devices"] == 2
    assert h0["tokens"] == h1["tokens"] == devices["reference_tokens"]
    report = h0["rollup"]
    assert report["hosts"] == 2 and set(report["per_host"]) == {"0", "1"}
    assert report["per_host"]["0"]["experts"] == [0, 1, 2, 3]
    assert report["per_host"]["1"]["experts"] == [4, 5, 6, 7]
    assert report["lookups"] == sum(h["lookups"] for h in report["per_host"].values())


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_a_clear_error(hosts):
    k0, k1 = hosts["kill0"], hosts["kill1"]
    ready = Path(str(k1.out) + ".ready")
    deadline = time.monotonic() + HARD_TIMEOUT_S / 2
    while not ready.exists():
        assert k1.proc.poll() is None, f"process 1 ended before initialising:\n{k1.stderr()[-2000:]}"
        assert time.monotonic() < deadline, "process 1 never initialised"
        time.sleep(0.2)
    os.kill(k1.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rc = k0.wait()
    stopped_after_s = time.monotonic() - killed_at
    err = k0.stderr()
    assert rc != 0
    assert "stopped sending heartbeats" in err or "moecxl watchdog" in err, err[-3000:]
    assert stopped_after_s < 90, f"survivor took {stopped_after_s:.0f} s to stop"


@pytest.mark.slow
def test_unreachable_coordinator_is_a_clear_error(hosts):
    u = hosts["unreachable"]
    rc = u.wait(60)
    err = u.stderr()
    assert rc != 0
    assert "DistributedError" in err and "not reachable within 3 s" in err, err[-2000:]


def test_rollup_sums_bytes_weights_hit_rates_and_takes_max_stall():
    a = {
        "host": 0,
        "hit_rate": 0.5,
        "lookups": 10,
        "misses": 5,
        "stall_s": 0.2,
        "bytes_by_tier": {"dram": 100},
    }
    b = {
        "host": 1,
        "hit_rate": 1.0,
        "lookups": 30,
        "misses": 0,
        "stall_s": 0.5,
        "bytes_by_tier": {"dram": 1, "cxl": 7},
    }
    r = rollup([a, b])
    assert r["bytes_by_tier"] == {"dram": 101, "cxl": 7} and r["bytes_total"] == 108
    assert r["hit_rate"] == pytest.approx((0.5 * 10 + 30) / 40)
    assert r["stall_s"] == 0.5 and r["stall_s_sum"] == pytest.approx(0.7)
    assert r["misses"] == 5 and set(r["per_host"]) == {"0", "1"}
    with pytest.raises(ValueError, match="one metrics dict per host"):
        rollup([])
