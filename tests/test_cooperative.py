"""Cooperative launches on a CPU device: every block of the grid resident at once (each
worker's share as fibers taking turns, each block with its own shared memory), so that
cooperative_groups' grid.sync works; a grid larger than the device holds refused with
CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, by the executor as well as by libcuda.so.1. The
nvcc-built tests/c/samples/cooperative_grid.cu runs the same through libcuda.so.1."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import GPU_COUNT, SANDBOX

import kubecash.client as kc
from kubecash.broker import cpukernels as ck
from kubecash.client.errors import CudaError

GRID = r"""
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
// rounds of: write my slot and my block's shared word, meet the grid, read a slot another
// block wrote and my own shared word back; bad counts what was wrong.
extern "C" __global__ void rounds(int* slots, int* bad, int n_rounds) {
    cg::grid_group g = cg::this_grid();
    __shared__ int mine[4];
    const unsigned n = g.size(), r = g.thread_rank();
    for (int k = 0; k < n_rounds; ++k) {
        slots[r] = k * 1000 + (int)r;
        if (threadIdx.x == 0) mine[0] = (int)blockIdx.x + 7 * k;
        g.sync();
        const unsigned peer = (r + blockDim.x + 1) % n;
        if (slots[peer] != k * 1000 + (int)peer) atomicAdd(bad, 1);
        __syncthreads();
        if (mine[0] != (int)blockIdx.x + 7 * k) atomicAdd(&bad[1], 1);
        g.sync();
    }
}
extern "C" __global__ void valid(int* out) { out[blockIdx.x] = cg::this_grid().is_valid(); }
extern "C" __global__ void meet(int* out) { cg::this_grid().sync(); out[blockIdx.x] = 1; }
// the last block traps before the grid barrier: the others wait there for it
extern "C" __global__ void trap_last(int* out) {
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) __trap();
    cg::this_grid().sync();
    out[blockIdx.x] = 1;
}
"""


@pytest.fixture(scope="module")
def grid_module(tmp_path_factory):
    m = ck.compile_module(GRID, cache_dir=tmp_path_factory.mktemp("coop-cache"))
    yield m
    m.close()


def _p(a: np.ndarray) -> bytes:
    return a.ctypes.data.to_bytes(8, "little")


@pytest.mark.parametrize("workers, blocks, threads", [(1, 24, 64), (2, 16, 256), (3, 5, 1000)])
def test_every_block_of_a_cooperative_grid_is_resident(grid_module, workers, blocks, threads):
    """More blocks than workers, each worker's share resident at once: the grid barrier is
    met every round, and each block's shared memory is its own (not its worker's)."""
    slots, bad = np.zeros(blocks * threads, np.int32), np.zeros(2, np.int32)
    with ck.Launcher(workers, sandbox=SANDBOX) as lz:
        lz.launch(grid_module, grid_module.kernel("rounds"), (blocks, 1, 1), (threads, 1, 1), 0,
                  [_p(slots), _p(bad), (4).to_bytes(4, "little")], cooperative=True)
        assert bad.tolist() == [0, 0]
        np.testing.assert_array_equal(slots, 3000 + np.arange(blocks * threads))
        # the same launcher still runs ordinary launches, and ordinary blocks after it
        out = np.full(3, 9, np.int32)
        lz.launch(grid_module, grid_module.kernel("valid"), (3, 1, 1), (32, 1, 1), 0, [_p(out)])
        assert out.tolist() == [0, 0, 0]          # not cooperative: no grid to synchronise
        lz.launch(grid_module, grid_module.kernel("valid"), (3, 1, 1), (32, 1, 1), 0, [_p(out)],
                  cooperative=True)
        assert out.tolist() == [1, 1, 1]


def test_a_grid_barrier_in_an_ordinary_launch_traps_as_on_a_gpu(grid_module):
    out = np.zeros(2, np.int32)
    with ck.Launcher(2, sandbox=SANDBOX) as lz:
        with pytest.raises(CudaError) as e:
            lz.launch(grid_module, grid_module.kernel("meet"), (2, 1, 1), (32, 1, 1), 0, [_p(out)])
        assert e.value.name == "CUDA_ERROR_ILLEGAL_INSTRUCTION" and "trap" in str(e.value), e.value
        lz.launch(grid_module, grid_module.kernel("meet"), (2, 1, 1), (32, 1, 1), 0, [_p(out)],
                  cooperative=True)
        assert out.tolist() == [1, 1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_block_that_traps_ends_the_whole_cooperative_grid(grid_module, workers):
    """The blocks waiting for it at the grid barrier (on its worker and on the others) are
    abandoned, as a GPU ends the grid: the launch fails rather than hangs, and the next runs."""
    out = np.zeros(6, np.int32)
    with ck.Launcher(workers, sandbox=SANDBOX) as lz:
        with pytest.raises(CudaError) as e:
            lz.launch(grid_module, grid_module.kernel("trap_last"), (6, 1, 1), (64, 1, 1), 0, [_p(out)],
                      cooperative=True)
        assert e.value.name == "CUDA_ERROR_ILLEGAL_INSTRUCTION" and "block: [5,0,0]" in str(e.value), e.value
        assert out.tolist() == [0] * 6
        lz.launch(grid_module, grid_module.kernel("meet"), (6, 1, 1), (64, 1, 1), 0, [_p(out)], cooperative=True)
        assert out.tolist() == [1] * 6


def test_a_share_past_the_resident_thread_bound_is_refused(grid_module):
    out = np.zeros(64, np.int32)
    with ck.Launcher(1, sandbox=SANDBOX) as lz:
        with pytest.raises(ValueError, match=f"at most {ck.MAX_COOP_FIBERS} can be resident"):
            lz.launch(grid_module, grid_module.kernel("meet"), (9, 1, 1), (1024, 1, 1), 0, [_p(out)],
                      cooperative=True)
        with pytest.raises(ValueError, match="runs its whole grid at once"):
            lz.launch(grid_module, grid_module.kernel("meet"), (4, 1, 1), (32, 1, 1), 0, [_p(out)],
                      cooperative=True, first_block=1)


def test_the_executor_runs_a_cooperative_grid_and_refuses_one_too_large(broker):
    """Through the protocol, as libcuda.so.1 sends it: the executor checks the grid against
    occupancy x multiprocessors itself (a program need not go through libcuda.so.1), the
    refusal names the limit, and the session and another tenant go on."""
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        ob = db.allocate(16)
        ob.copy_from(b"b" * 16)
        sms = da.properties["multiprocessor_count"]
        per_sm = min(da.properties["max_threads_per_multiprocessor"] // 256,
                     da.properties["max_blocks_per_multiprocessor"])
        blocks = per_sm * sms
        m = da.load_module(GRID)
        rounds = m.get_kernel("rounds")
        slots, bad = da.allocate(blocks * 256 * 4), da.allocate(8)
        bad.copy_from(bytes(8))
        da.launch(rounds, (blocks,), (256,), [slots, bad, 3], cooperative=True)
        da.synchronize()
        assert bytes(bad.copy_to()) == bytes(8)
        got = np.frombuffer(bytes(slots.copy_to()), np.int32)
        np.testing.assert_array_equal(got, 2000 + np.arange(blocks * 256))
        da.launch(rounds, (blocks + 1,), (256,), [slots, bad, 1], cooperative=True)
        with pytest.raises(kc.CudaError) as e:
            da.synchronize()
        assert e.value.name == "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", e.value
        assert f"at most {blocks} blocks of 256 threads ({per_sm} per multiprocessor x {sms})" in str(e.value)
        da.launch(rounds, (blocks,), (256,), [slots, bad, 1], cooperative=True)   # not sticky
        da.synchronize()
        assert bytes(bad.copy_to()) == bytes(8)
        assert bytes(ob.copy_to()) == b"b" * 16
    assert broker.alive()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_COUNT == 0, reason="no NVIDIA GPU here (NVML finds none)")
def test_a_cooperative_grid_runs_on_a_gpu(broker):
    """The GPU executor launches it with cuLaunchCooperativeKernel; the GPU checks the size."""
    with broker.connect("alice") as s:
        d = s.device("gpu0")
        rounds = d.load_module(GRID).get_kernel("rounds")
        blocks = 2 * d.properties.get("multiprocessor_count", 1)
        slots, bad = d.allocate(blocks * 256 * 4), d.allocate(8)
        bad.copy_from(bytes(8))
        d.launch(rounds, (blocks,), (256,), [slots, bad, 3], cooperative=True)
        d.synchronize()
        assert bytes(bad.copy_to()) == bytes(8)
        d.launch(rounds, (1 << 20,), (256,), [slots, bad, 1], cooperative=True)
        with pytest.raises(kc.CudaError) as e:
            d.synchronize()
        assert e.value.name == "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", e.value
