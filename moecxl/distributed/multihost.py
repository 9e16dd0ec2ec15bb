"""Several processes (hosts) as one JAX system: `jax.distributed` with timeouts, a watchdog, gathers.

Failure modes are bounded: an unreachable coordinator fails `initialize` within `timeout_s`; a peer that
dies is noticed by the coordination service's heartbeats (`heartbeat_timeout_s`), and a `Watchdog`
ends a process whose step made no progress for `stall_s` (a collective waiting on a dead peer), with
an error naming the step and the peers, instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

EXIT_STALLED = 75  # the watchdog's exit status


class DistributedError(RuntimeError):
    """The multi-process system cannot start or continue; the message names the address and process."""


def free_port() -> int:
    """A TCP port free on localhost now (for a test's coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(address: str, deadline_s: float) -> bool:
    host, port = address.rsplit(":", 1)
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline_s:
                return False
            time.sleep(0.2)


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_devices: int | None = None,
    timeout_s: int = 30,
    heartbeat_timeout_s: int = 10,
    shutdown_timeout_s: int = 10,
) -> None:
    """`jax.distributed.initialize` with bounded waits; `local_devices` forces that many CPU devices.

    Raises `DistributedError` naming the address when the coordinator is not reachable in `timeout_s`.
    """
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id {process_id} is outside [0, {num_processes})")
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    deadline = time.monotonic() + timeout_s
    # Process 0 hosts the coordinator; the others first check that its port answers, so an unreachable
    # address is a Python error here rather than a fatal abort inside the runtime.
    if process_id != 0 and not _reachable(coordinator_address, deadline):
        raise DistributedError(
            f"coordinator {coordinator_address} not reachable within {timeout_s} s "
            f"(process {process_id} of {num_processes}); is process 0 running and the address right?"
        )
    remaining = max(1, int(deadline - time.monotonic()))
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=remaining,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except Exception as e:  # the runtime's errors are XlaRuntimeError / RuntimeError with long texts
        raise DistributedError(
            f"jax.distributed.initialize(coordinator {coordinator_address}, process {process_id} of "
            f"{num_processes}) failed within {timeout_s} s: {e}"
        ) from e


class Watchdog:
    """Ends this process (exit 75, message on stderr) when `beat()` is not called for `stall_s`.

    A collective whose peer died never returns; the runtime's heartbeat may take longer to notice
    (or may not, mid-collective): the watchdog bounds the wait. Use as a context manager.
    """

    def __init__(self, stall_s: float, what: str = "step"):
        self.stall_s, self.what = stall_s, what
        self.last = time.monotonic()
        self.label = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="moecxl-watchdog")

    def beat(self, label: str = "") -> None:
        self.last, self.label = time.monotonic(), label or self.label

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            idle = time.monotonic() - self.last
            if idle > self.stall_s:
                msg = (
                    f"moecxl watchdog: process {jax.process_index()} of {jax.process_count()} made no progress "
                    f"for {idle:.1f} s after {self.what} {self.label!r} (limit {self.stall_s} s): a peer "
                    f"process has probably died; stopping"
                )
                print(msg, file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)

    def __enter__(self) -> Watchdog:
        self.beat("start")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (through a collective, no side channel)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True, default=float).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
    buf = np.zeros(n, np.uint8)
    buf[: raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), n)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in every]
