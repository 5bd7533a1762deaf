"""A corpus of CUDA C kernels on the CPU backend: asynchronous copies (cuda::pipeline,
cuda::barrier + cuda::memcpy_async, cooperative_groups memcpy_async/wait), mbarriers,
cooperative-groups tiles (reduce, scans, shfl, ballot, any/all, coalesced groups), and the
classic shared-memory and warp-shuffle patterns, compiled through the real path (NVRTC for
sm_80 and sm_90, and nvcc -ptx / -fatbin where a toolkit is installed), each checked against
numpy. Modules are cached by content hash in one directory for the file."""
from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
from conftest import SANDBOX
from toolkit import NO_NVCC, NVCC

import kubecash.client as kc
from kubecash.broker import cpukernels as ck
from kubecash.broker import ptx
from kubecash.broker.ptx import fatbin

pytest.importorskip("cuda.pathfinder", reason="NVRTC (pip nvidia-cuda-nvrtc) compiles the corpus")

ARCHS = ("sm_80", "sm_90")

PIPELINE = r"""
#include <cuda/pipeline>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
// Per-thread pipeline (thread_scope_thread): cp.async + commit/wait groups, double buffered.
extern "C" __global__ void pipe_thread(const float* in, float* out, int chunks) {
    __shared__ float buf[2][128];
    cuda::pipeline<cuda::thread_scope_thread> pipe = cuda::make_pipeline();
    int t = threadIdx.x;
    const float* base = in + (size_t)blockIdx.x * chunks * blockDim.x;
    pipe.producer_acquire();
    cuda::memcpy_async(&buf[0][t], base + t, sizeof(float), pipe);
    pipe.producer_commit();
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) {
            pipe.producer_acquire();
            cuda::memcpy_async(&buf[(c + 1) & 1][t], base + (c + 1) * blockDim.x + t, sizeof(float), pipe);
            pipe.producer_commit();
        }
        if (c + 1 < chunks) cuda::pipeline_consumer_wait_prior<1>(pipe);
        else cuda::pipeline_consumer_wait_prior<0>(pipe);
        acc += buf[c & 1][t] * (c + 1);
        pipe.consumer_release();
    }
    out[blockIdx.x * blockDim.x + t] = acc;
}
// Block-scope pipeline, producer and consumer roles (half the block each), 2 stages.
extern "C" __global__ void pipe_roles(const float* in, float* out, int chunks) {
    constexpr int stages = 2, W = 64;
    __shared__ float buf[stages][W];
    __shared__ cuda::pipeline_shared_state<cuda::thread_scope_block, stages> state;
    auto block = cg::this_thread_block();
    const int half = blockDim.x / 2;
    const bool producer = threadIdx.x < half;
    auto role = producer ? cuda::pipeline_role::producer : cuda::pipeline_role::consumer;
    auto pipe = cuda::make_pipeline(block, &state, role);
    const float* base = in + (size_t)blockIdx.x * chunks * W;
    float acc = 0.f;
    for (int c = 0; c < chunks; ++c) {
        if (producer) {
            pipe.producer_acquire();
            for (int i = threadIdx.x; i < W; i += half)
                cuda::memcpy_async(&buf[c % stages][i], base + c * W + i, sizeof(float), pipe);
            pipe.producer_commit();
        } else {
            pipe.consumer_wait();
            for (int i = threadIdx.x - half; i < W; i += half) acc += buf[c % stages][i] * (c + 1);
            pipe.consumer_release();
        }
    }
    if (!producer) out[blockIdx.x * half + threadIdx.x - half] = acc;
}
"""
BARRIER = r"""
#include <cuda/barrier>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
using barrier_t = cuda::barrier<cuda::thread_scope_block>;
__device__ cg::thread_block ready(barrier_t* bar) {     // one thread initializes, all see it
    auto block = cg::this_thread_block();
    if (block.thread_rank() == 0) init(bar, block.size());
    block.sync();
    return block;
}
// cuda::memcpy_async of a whole tile through a block barrier, then a reversal.
extern "C" __global__ void barrier_copy(const int* in, int* out, int n) {
    __shared__ alignas(16) int tile[256];
    __shared__ barrier_t bar;
    auto block = ready(&bar);
    cuda::memcpy_async(block, tile, in + blockIdx.x * n, sizeof(int) * n, bar);
    bar.arrive_and_wait();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[blockIdx.x * n + i] = tile[n - 1 - i] * 3;
    bar.arrive_and_wait();              // phase 2: every read of the tile done
    // a third phase through the same barrier: arrive returns a token, wait on it
    for (int i = threadIdx.x; i < n; i += blockDim.x) tile[i] += 1;
    auto tok = bar.arrive();
    bar.wait(std::move(tok));
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[gridDim.x * n + blockIdx.x * n + i] = tile[(i + 1) % n];
}
// aligned (16-byte) copies: on sm_90 these may become bulk copies with a transaction count
extern "C" __global__ void barrier_aligned(const float4* in, float4* out, int n) {
    __shared__ alignas(16) float4 tile[64];
    __shared__ barrier_t bar;
    auto block = ready(&bar);
    cuda::memcpy_async(block, tile, in + blockIdx.x * n, cuda::aligned_size_t<16>(sizeof(float4) * n), bar);
    bar.arrive_and_wait();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float4 v = tile[i];
        out[blockIdx.x * n + i] = make_float4(v.w, v.z, v.y, v.x);
    }
}
// arrive_and_drop: half the threads leave after the first phase
extern "C" __global__ void barrier_drop(int* out) {
    __shared__ barrier_t bar;
    __shared__ int s[64];
    if (threadIdx.x == 0) init(&bar, blockDim.x);
    __syncthreads();
    s[threadIdx.x] = threadIdx.x;
    if (threadIdx.x >= blockDim.x / 2) { bar.arrive_and_drop(); return; }
    bar.arrive_and_wait();
    int v = s[threadIdx.x + blockDim.x / 2];
    bar.arrive_and_wait();
    s[threadIdx.x] = v * 2;
    bar.arrive_and_wait();
    out[threadIdx.x] = s[(threadIdx.x + 1) % (blockDim.x / 2)];
}
"""
CGCOPY = r"""
#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>
namespace cg = cooperative_groups;
// cg::memcpy_async + cg::wait, two stages, a block-wide sum per chunk
extern "C" __global__ void cg_copy(const float* in, float* out, int chunk, int nchunks) {
    extern __shared__ float sm[];
    auto block = cg::this_thread_block();
    float* a = sm; float* b = sm + chunk;
    const float* base = in + (size_t)blockIdx.x * chunk * nchunks;
    cg::memcpy_async(block, a, base, sizeof(float) * chunk);
    for (int c = 0; c < nchunks; ++c) {
        if (c + 1 < nchunks) {
            cg::memcpy_async(block, b, base + (c + 1) * chunk, sizeof(float) * chunk);
            cg::wait_prior<1>(block);
        } else {
            cg::wait(block);
        }
        for (int i = block.thread_rank(); i < chunk; i += block.size())
            out[(size_t)blockIdx.x * chunk * nchunks + c * chunk + i] = a[i] * 2.f + a[(i + 1) % chunk];
        block.sync();
        float* t = a; a = b; b = t;
    }
}
// a tile of 32 copies its own slice
extern "C" __global__ void cg_tile_copy(const int* in, int* out) {
    __shared__ int s[128];
    auto block = cg::this_thread_block();
    auto tile = cg::tiled_partition<32>(block);
    int* mine = s + tile.meta_group_rank() * 32;
    cg::memcpy_async(tile, mine, in + blockIdx.x * 128 + tile.meta_group_rank() * 32, sizeof(int) * 32);
    cg::wait(tile);
    out[blockIdx.x * 128 + threadIdx.x] = mine[31 - tile.thread_rank()];
}
"""
TILES = r"""
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
#include <cooperative_groups/scan.h>
namespace cg = cooperative_groups;
extern "C" __global__ void tiles(const int* in, int* out, int n) {
    auto block = cg::this_thread_block();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = i < n ? in[i] : 0;
    auto t32 = cg::tiled_partition<32>(block);
    auto t16 = cg::tiled_partition<16>(block);
    auto t4 = cg::tiled_partition<4>(block);
    int r32 = cg::reduce(t32, v, cg::plus<int>());
    int r16 = cg::reduce(t16, v, cg::greater<int>());
    int r4 = cg::reduce(t4, v, cg::less<int>());
    int inc = cg::inclusive_scan(t32, v);
    int exc = cg::exclusive_scan(t16, v, cg::plus<int>());
    int sh = t4.shfl(v, 3);
    int dn = t16.shfl_down(v, 1);
    unsigned bal = t32.ballot(v & 1);
    int an = t16.any(v > 90);
    int al = t4.all(v > 10);
    if (i < n) {
        out[0 * n + i] = r32; out[1 * n + i] = r16; out[2 * n + i] = r4; out[3 * n + i] = inc;
        out[4 * n + i] = exc; out[5 * n + i] = sh; out[6 * n + i] = dn; out[7 * n + i] = (int)bal;
        out[8 * n + i] = an; out[9 * n + i] = al;
    }
}
// coalesced_threads(): the odd-valued lanes, ranked and summed among themselves
extern "C" __global__ void coalesced(const int* in, int* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = in[i];
    out[i] = -1;
    if (v & 1) {
        auto g = cg::coalesced_threads();
        int s = cg::reduce(g, v, cg::plus<int>());
        int r = g.thread_rank();
        int x = cg::exclusive_scan(g, v);
        out[i] = s * 1000000 + r * 10000 + x % 10000;
    }
}
"""
CLASSIC = r"""
// shared-memory block reduction and Hillis-Steele block scan
extern "C" __global__ void block_reduce(const float* in, float* out, int n) {
    __shared__ float s[256];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? in[i] : 0.f;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) { if (t < k) s[t] += s[t + k]; __syncthreads(); }
    if (t == 0) out[blockIdx.x] = s[0];
}
extern "C" __global__ void block_scan(const int* in, int* out, int n) {
    __shared__ int s[2][256];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t, p = 0;
    s[0][t] = i < n ? in[i] : 0;
    __syncthreads();
    for (int k = 1; k < blockDim.x; k <<= 1) {
        s[1 - p][t] = s[p][t] + (t >= k ? s[p][t - k] : 0);
        p = 1 - p;
        __syncthreads();
    }
    if (i < n) out[i] = s[p][t];
}
// warp-shuffle reduction, then one atomic per warp
extern "C" __global__ void warp_reduce(const double* in, double* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    double v = i < n ? in[i] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, v);
}
// ballot-based stream compaction: keep the positive values, in order within a warp
extern "C" __global__ void compact(const int* in, int* out, unsigned* count, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = i < n ? in[i] : 0;
    bool keep = i < n && v > 0;
    unsigned mask = __ballot_sync(0xffffffffu, keep);
    int lane = threadIdx.x & 31;
    unsigned base = 0;
    if (lane == 0 && mask) base = atomicAdd(count, __popc(mask));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (keep) out[base + __popc(mask & ((1u << lane) - 1))] = v;
}
// histograms: global atomics, and shared atomics merged per block
extern "C" __global__ void hist_global(const unsigned char* in, unsigned* h, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomicAdd(&h[in[i]], 1u);
}
extern "C" __global__ void hist_shared(const unsigned char* in, unsigned* h, int n) {
    __shared__ unsigned s[256];
    for (int k = threadIdx.x; k < 256; k += blockDim.x) s[k] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomicAdd(&s[in[i]], 1u);
    __syncthreads();
    for (int k = threadIdx.x; k < 256; k += blockDim.x) if (s[k]) atomicAdd(&h[k], s[k]);
}
"""

@pytest.fixture(scope="module")
def corpus_launcher():
    with ck.Launcher(2, sandbox=SANDBOX) as lz:
        yield lz


@pytest.fixture(scope="module")
def build(kernel_cache, tmp_path_factory):
    """A module of the corpus for an architecture, through NVRTC or nvcc (-ptx, -fatbin),
    built once per file (and cached by content hash for the session)."""
    modules, cache_dir, work = {}, kernel_cache, tmp_path_factory.mktemp("nvcc")

    def _build(src: str, arch: str = "sm_80", via: str = "nvrtc"):
        key = (src, arch, via)
        if key not in modules:
            if via == "nvrtc":
                modules[key] = ck.compile_module(src, [f"-arch={arch}"], cache_dir=cache_dir)
            else:
                modules[key] = ck.compile_module(_nvcc_ptx(src, arch, via, work), cache_dir=cache_dir,
                                                 language="ptx")
        return modules[key]
    yield _build
    for m in modules.values():
        m.close()


def _nvcc_ptx(src: str, arch: str, via: str, work) -> str:
    if NVCC is None:
        pytest.skip(NO_NVCC)
    cu = work / f"k{abs(hash(src))}_{arch}.cu"
    cu.write_text(src)
    out = cu.with_suffix("." + via)
    flag = "-ptx" if via == "ptx" else "-fatbin"
    cc = arch[3:]
    target = [f"-arch=compute_{cc}"] if via == "ptx" else [f"--generate-code=arch=compute_{cc},code=compute_{cc}"]
    subprocess.run([NVCC, flag, *target, "-std=c++17", "-o", str(out), str(cu)], check=True, capture_output=True,
                   timeout=120)
    data = out.read_bytes()
    return data.decode() if via == "ptx" else fatbin.ptx_from_image(data)


def ptr(a: np.ndarray) -> bytes:
    return a.ctypes.data.to_bytes(8, "little")


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def run(lz, m, name, grid, block, args, shared=0):
    lz.launch(m, m.kernel(name), (grid, 1, 1), (block, 1, 1), shared, args)


rng = np.random.default_rng(7)


# -- cuda::pipeline ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,via", [("sm_80", "nvrtc"), ("sm_90", "nvrtc"), ("sm_80", "ptx"), ("sm_90", "fatbin")])
def test_pipeline_per_thread_double_buffering(build, corpus_launcher, arch, via):
    m = build(PIPELINE, arch, via)
    B, C, T = 3, 5, 128
    x = rng.random((B, C, T), np.float32)
    out = np.zeros((B, T), np.float32)
    run(corpus_launcher, m, "pipe_thread", B, T, [ptr(x), ptr(out), i32(C)])
    want = (x * np.arange(1, C + 1, dtype=np.float32)[None, :, None]).sum(1)
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_producer_consumer_roles(build, corpus_launcher, arch):
    m = build(PIPELINE, arch)
    B, C, W = 4, 6, 64
    x = rng.random((B, C, W), np.float32)
    out = np.zeros((B, 32), np.float32)
    run(corpus_launcher, m, "pipe_roles", B, 64, [ptr(x), ptr(out), i32(C)])
    want = (x * np.arange(1, C + 1, dtype=np.float32)[None, :, None]).sum(1).reshape(B, 2, 32).sum(1)
    np.testing.assert_allclose(out, want, rtol=1e-5)


# -- cuda::barrier -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,via", [("sm_80", "nvrtc"), ("sm_90", "nvrtc"), ("sm_90", "ptx")])
def test_barrier_memcpy_async_and_phases(build, corpus_launcher, arch, via):
    m = build(BARRIER, arch, via)
    G, n = 3, 200
    x = rng.integers(-1000, 1000, (G, n), dtype=np.int32)
    out = np.zeros(2 * G * n, np.int32)
    run(corpus_launcher, m, "barrier_copy", G, 96, [ptr(x), ptr(out), i32(n)])
    np.testing.assert_array_equal(out[:G * n].reshape(G, n), x[:, ::-1] * 3)
    np.testing.assert_array_equal(out[G * n:].reshape(G, n), np.roll(x + 1, -1, axis=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_barrier_aligned_copy(build, corpus_launcher, arch):
    m = build(BARRIER, arch)               # sm_90: a bulk copy completing transactions
    G, n = 2, 64
    x = rng.random((G, n, 4), np.float32)
    out = np.zeros_like(x)
    run(corpus_launcher, m, "barrier_aligned", G, 64, [ptr(x), ptr(out), i32(n)])
    np.testing.assert_array_equal(out, x[:, :, ::-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_barrier_arrive_and_drop(build, corpus_launcher, arch):
    m = build(BARRIER, arch)
    out = np.zeros(64, np.int32)
    run(corpus_launcher, m, "barrier_drop", 1, 64, [ptr(out)])
    t = np.arange(32)
    np.testing.assert_array_equal(out[:32], ((t + 1) % 32 + 32) * 2)


# -- cooperative groups ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_cg_memcpy_async_and_wait(build, corpus_launcher, arch):
    m = build(CGCOPY, arch)
    B, chunk, nchunks = 2, 96, 4
    x = rng.random((B, nchunks, chunk), np.float32)
    out = np.zeros_like(x)
    run(corpus_launcher, m, "cg_copy", B, 64, [ptr(x), ptr(out), i32(chunk), i32(nchunks)], shared=2 * chunk * 4)
    np.testing.assert_allclose(out, x * 2 + np.roll(x, -1, axis=2), rtol=1e-6)
    y = rng.integers(0, 1 << 20, (2, 4, 32), dtype=np.int32)
    o = np.zeros_like(y)
    run(corpus_launcher, m, "cg_tile_copy", 2, 128, [ptr(y), ptr(o)])
    np.testing.assert_array_equal(o, y[:, :, ::-1])


def _groups(v, k):
    return v.reshape(-1, k)


def test_cg_tiles_reduce_scan_shfl_vote(build, corpus_launcher):
    m = build(TILES)
    n = 256
    v = rng.integers(0, 101, n, dtype=np.int32)
    out = np.zeros(10 * n, np.int32)
    run(corpus_launcher, m, "tiles", n // 128, 128, [ptr(v), ptr(out), i32(n)])
    o = out.reshape(10, n)
    g32, g16, g4 = _groups(v, 32), _groups(v, 16), _groups(v, 4)
    np.testing.assert_array_equal(o[0], np.repeat(g32.sum(1), 32))
    np.testing.assert_array_equal(o[1], np.repeat(g16.max(1), 16))
    np.testing.assert_array_equal(o[2], np.repeat(g4.min(1), 4))
    np.testing.assert_array_equal(o[3], np.cumsum(g32, 1).ravel())
    np.testing.assert_array_equal(o[4], (np.cumsum(g16, 1) - g16).ravel())
    np.testing.assert_array_equal(o[5], np.repeat(g4[:, 3], 4))
    np.testing.assert_array_equal(o[6], np.concatenate([g16[:, 1:], g16[:, -1:]], 1).ravel())
    bal = ((g32 & 1).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1)
    np.testing.assert_array_equal(o[7].view(np.uint32), np.repeat(bal.astype(np.uint32), 32))
    np.testing.assert_array_equal(o[8] != 0, np.repeat((g16 > 90).any(1), 16))
    np.testing.assert_array_equal(o[9] != 0, np.repeat((g4 > 10).all(1), 4))


def test_cg_coalesced_threads(build, corpus_launcher):
    m = build(TILES)
    v = rng.integers(0, 50, 128, dtype=np.int32)
    out = np.zeros(128, np.int32)
    run(corpus_launcher, m, "coalesced", 1, 128, [ptr(v), ptr(out)])
    want = np.full(128, -1, np.int64)
    for w in range(4):
        idx = [w * 32 + lane for lane in range(32) if v[w * 32 + lane] & 1]
        vals = v[idx].astype(np.int64)
        for r, i in enumerate(idx):
            want[i] = vals.sum() * 1_000_000 + r * 10_000 + vals[:r].sum() % 10_000
    np.testing.assert_array_equal(out, want.astype(np.int32))


# -- classic patterns --------------------------------------------------------------------------

def test_block_reduce_scan_and_warp_shuffle(build, corpus_launcher):
    m = build(CLASSIC)
    n = 1000
    x = rng.random(n, np.float32)
    out = np.zeros(4, np.float32)
    run(corpus_launcher, m, "block_reduce", 4, 256, [ptr(x), ptr(out), i32(n)])
    np.testing.assert_allclose(out, np.add.reduceat(x, [0, 256, 512, 768]), rtol=1e-5)
    a = rng.integers(-50, 50, n, dtype=np.int32)
    s = np.zeros(n, np.int32)
    run(corpus_launcher, m, "block_scan", 4, 256, [ptr(a), ptr(s), i32(n)])
    want = np.concatenate([np.cumsum(a[k:k + 256]) for k in range(0, n, 256)])
    np.testing.assert_array_equal(s, want)
    d = rng.random(n)
    tot = np.zeros(1)
    run(corpus_launcher, m, "warp_reduce", 4, 256, [ptr(d), ptr(tot), i32(n)])
    np.testing.assert_allclose(tot[0], d.sum(), rtol=1e-12)


def test_ballot_stream_compaction(build, corpus_launcher):
    m = build(CLASSIC)
    n = 1000
    a = rng.integers(-100, 100, n, dtype=np.int32)
    out = np.zeros(n, np.int32)
    count = np.zeros(1, np.uint32)
    run(corpus_launcher, m, "compact", 4, 256, [ptr(a), ptr(out), ptr(count), i32(n)])
    keep = a[a > 0]
    assert count[0] == len(keep)
    np.testing.assert_array_equal(np.sort(out[:len(keep)]), np.sort(keep))


def test_atomic_histograms_global_and_shared(build, corpus_launcher):
    m = build(CLASSIC)
    n = 20_000
    x = rng.integers(0, 256, n, dtype=np.uint8)
    for k in ("hist_global", "hist_shared"):
        h = np.zeros(256, np.uint32)
        run(corpus_launcher, m, k, 8, 128, [ptr(x), ptr(h), i32(n)])
        np.testing.assert_array_equal(h, np.bincount(x, minlength=256))


# -- mbarrier semantics, deadlocks, refusals ---------------------------------------------------

MBAR = r"""
#include <cuda/std/cstdint>
__device__ unsigned long long arrive(unsigned bar, unsigned n) {
    unsigned long long s;
    asm volatile("mbarrier.arrive.shared.b64 %0, [%1], %2;" : "=l"(s) : "r"(bar), "r"(n) : "memory");
    return s;
}
__device__ int test(unsigned bar, unsigned long long s) {
    unsigned p;
    asm volatile("{ .reg .pred q; mbarrier.test_wait.shared.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                 : "=r"(p) : "r"(bar), "l"(s) : "memory");
    return p;
}
__device__ int test_parity(unsigned bar, unsigned parity) {
    unsigned p;
    asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2, 1000; selp.u32 %0, 1, 0, q; }"
                 : "=r"(p) : "r"(bar), "r"(parity) : "memory");
    return p;
}
// one thread walks a barrier through its phases; out: what it saw
extern "C" __global__ void mbar_walk(int* out) {
    __shared__ unsigned long long bar;
    unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    asm volatile("mbarrier.init.shared.b64 [%0], 3;" :: "r"(b));
    unsigned long long s = arrive(b, 1);
    unsigned pend;
    asm volatile("mbarrier.pending_count.b64 %0, %1;" : "=r"(pend) : "l"(s));
    out[0] = pend;                       // 2 still to arrive
    out[1] = test(b, s);                 // 0: phase 0 open
    asm volatile("mbarrier.expect_tx.shared.b64 [%0], 64;" :: "r"(b));
    arrive(b, 2);                        // all arrived, 64 bytes outstanding
    out[2] = test(b, s) + 2 * test_parity(b, 0);   // 0
    asm volatile("mbarrier.complete_tx.shared.b64 [%0], 64;" :: "r"(b));
    out[3] = test(b, s) + 2 * test_parity(b, 0) + 4 * test_parity(b, 1);   // 3: phase 0 done
    unsigned long long s1;
    asm volatile("mbarrier.arrive_drop.shared.b64 %0, [%1];" : "=l"(s1) : "r"(b));   // expected now 2
    asm volatile("mbarrier.arrive.noComplete.shared.b64 _, [%0], 1;" :: "r"(b));
    out[4] = test(b, s1);                // 0: noComplete never completes the phase
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], 16;" :: "r"(b));
    out[5] = test(b, s1);                // 0: 16 bytes pending
    asm volatile("mbarrier.complete_tx.shared.b64 [%0], 16;" :: "r"(b));
    out[6] = test(b, s1);                // 1: all arrived (noComplete's too), the last bytes complete it
    s = arrive(b, 2);                    // phase 2 (expected 2)
    out[7] = test(b, s) + 2 * test_parity(b, 0);   // 1 + 2: phase 2 (even) done
    asm volatile("mbarrier.inval.shared.b64 [%0];" :: "r"(b));
}
// a barrier no thread can complete: expected one more arrival than there are threads
extern "C" __global__ void mbar_deadlock(int* out) {
    __shared__ unsigned long long bar;
    unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    if (threadIdx.x == 0) asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(b), "r"(blockDim.x + 1));
    __syncthreads();
    unsigned long long s = arrive(b, 1);
    while (!test(b, s)) {}
    out[threadIdx.x] = 1;
}
// lanes spin on a barrier the last lane completes after a long detour
extern "C" __global__ void mbar_late(int* out, int spin) {
    __shared__ unsigned long long bar;
    unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    if (threadIdx.x == 0) asm volatile("mbarrier.init.shared.b64 [%0], %1;" :: "r"(b), "r"(blockDim.x));
    __syncthreads();
    int acc = 0;
    if (threadIdx.x == blockDim.x - 1) for (int i = 0; i < spin; ++i) acc += i & 3;
    unsigned long long s = arrive(b, 1);
    while (!test(b, s)) {}
    out[threadIdx.x] = (int)threadIdx.x + (acc & 0);
}
"""


def test_mbarrier_phases_pending_counts_and_transactions(build, corpus_launcher):
    m = build(MBAR)
    out = np.full(8, -1, np.int32)
    run(corpus_launcher, m, "mbar_walk", 1, 1, [ptr(out)])
    assert out.tolist() == [2, 0, 0, 3, 0, 0, 1, 3]


def test_an_mbarrier_that_cannot_complete_fails_the_launch(build, corpus_launcher):
    m = build(MBAR)
    out = np.zeros(64, np.int32)
    with pytest.raises(kc.LaunchFailedError, match="deadlocked") as e:
        run(corpus_launcher, m, "mbar_deadlock", 2, 64, [ptr(out)])
    assert e.value.name == "CUDA_ERROR_LAUNCH_TIMEOUT"
    assert not out.any()
    run(corpus_launcher, m, "mbar_late", 3, 64, [ptr(out), i32(1000)])   # the fibers start afresh after it
    np.testing.assert_array_equal(out, np.arange(64))


@pytest.mark.parametrize("line", [
    "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r1}], [%r1];",
    "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.u32 [%rd1], [%r1], 16;",
    "mbarrier.arrive.shared::cluster.b64 %rd1, [%r1], %r1, %r1;",
    "cp.async.ca.shared.global [%r1], [%rd1], 12;",
])
def test_what_is_not_run_is_refused_by_name_and_line(line):
    text = (".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k()\n{\n"
            f".reg .b32 %r<2>;\n.reg .b64 %rd<2>;\n{line}\nret;\n}}\n")
    with pytest.raises((ptx.PtxUnsupportedError, ptx.PtxError), match="line 8"):
        ptx.to_cpp(text)
