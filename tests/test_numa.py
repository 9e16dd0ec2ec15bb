"""NUMA placement: buffers land on the node asked for (per move_pages), aligned, and say so when not."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from moecxl.memory import (
    NumaError,
    alloc_on_node,
    bound_to_node,
    node_of_pages,
    num_nodes,
    numa,
    verify_on_node,
)

pytestmark = pytest.mark.skipif(not numa.supported(), reason=numa.status())


def test_buffer_lands_on_node0_per_move_pages():
    nbytes = 5 * mmap.PAGESIZE + 123
    buf = alloc_on_node(nbytes, 0)
    assert buf.dtype == np.uint8 and buf.shape == (nbytes,)
    pages = node_of_pages(buf)
    assert pages.shape == (6,) and (pages == 0).all()  # every page touched and placed, none left at -2
    assert verify_on_node(buf, 0) == 6
    assert num_nodes() >= 1 and 0 in numa.memory_nodes()


@pytest.mark.parametrize("align", [64, 4096, 1 << 16])
def test_alignment(align):
    buf = alloc_on_node(1000, 0, align=align)
    assert buf.ctypes.data % align == 0
    verify_on_node(buf, 0)


def test_missing_node_is_a_clear_error():
    missing = max(numa.memory_nodes()) + 7
    with pytest.raises(NumaError, match=rf"NUMA node {missing} does not exist.*nodes available: \[0"):
        alloc_on_node(4096, missing)
    with pytest.raises(NumaError, match=rf"NUMA node {missing}"), bound_to_node(missing):
        pass


def test_untouched_pages_are_reported_not_guessed():
    raw = np.frombuffer(
        mmap.mmap(-1, 3 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
    )
    assert (node_of_pages(raw) == numa.NODE_NOT_TOUCHED).all()
    with pytest.raises(NumaError, match="3 of 3 pages are not on node 0: 3 on untouched"):
        verify_on_node(raw, 0)


def test_data_written_survives_and_views_keep_the_buffer_alive():
    buf = alloc_on_node(1 << 20, 0)
    weights = buf.view(np.float32).reshape(512, 512)
    expected = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)
    weights[:] = expected
    del buf
    np.testing.assert_array_equal(weights, expected)
    verify_on_node(weights, 0)


def test_bound_to_node_places_foreign_allocations():
    with bound_to_node(0):
        x = np.ones(1 << 18)  # allocated and first touched under the policy
    verify_on_node(x, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        alloc_on_node(10, 0, align=48)
    with pytest.raises(ValueError, match="nbytes"):
        alloc_on_node(-1, 0)
    assert alloc_on_node(0, 0).size == 0


def test_fallback_reports_node_unknown(monkeypatch):
    monkeypatch.setattr(numa, "_NR", None)  # as on macOS or an unknown architecture
    with pytest.warns(RuntimeWarning, match="NUMA placement unavailable"):
        buf = alloc_on_node(10_000, 0)
    assert buf.ctypes.data % 64 == 0 and buf.size == 10_000
    assert (node_of_pages(buf) == numa.NODE_UNKNOWN).all()
    with pytest.raises(NumaError, match="cannot verify placement on node 0"):
        verify_on_node(buf, 0)
