"""Modules on each architecture the CPU backend runs on (x86-64, aarch64, riscv64): kernels
with barriers, warp shuffles, mbarrier waits (lanes that yield), recursion on fiber stacks,
half-precision conversions, atomics and a cooperative grid (grid.sync), compiled by NVRTC,
translated, and built with that architecture's g++ and the flags modules are built with: as
a module (which must carry no load-time code: gcc's arm64 outline atomics would add some)
and linked into a small driver run natively or under qemu-user, its results checked against numpy. The fiber switch
(kubecash_runtime.h) is written by hand for each architecture: this is its test there.

The cross compilers and qemu come from Debian's packages (g++-aarch64-linux-gnu,
g++-riscv64-linux-gnu, qemu-user-static; .ci/run installs them); where one is missing its
architecture is skipped, saying which."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time

import numpy as np
import pytest

from kubecash.broker import ptx
from kubecash.broker.cpukernels import build, nvrtc, options
from kubecash.broker.cpukernels.errors import UnsupportedConstructError

pytest.importorskip("cuda.pathfinder", reason="NVRTC (pip nvidia-cuda-nvrtc) compiles the kernels")

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "native_src", "fiber_driver.cpp")
N, BLOCK = 2048, 256

KERNELS = {
    # barriers: a shared-memory tree reduction
    "reduce": r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    __shared__ float s[256];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? a[i] * b[i] : 0.f;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) { if (t < w) s[t] += s[t + w]; __syncthreads(); }
    if (t == 0) c[blockIdx.x] = s[0];
}""",
    # warp operations: a value held across each shuffle (callee-saved float registers)
    "shfl": r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    __shared__ float s[32];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? a[i] * b[i] : 0.f, keep = v * 0.5f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) t += s[w];
    c[i] = t + keep;
}""",
    # mbarrier waits: lanes yield until the phase completes
    "barrier": r"""
#include <cuda/barrier>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    __shared__ alignas(16) float tile[256];
    __shared__ cuda::barrier<cuda::thread_scope_block> bar;
    auto block = cg::this_thread_block();
    if (block.thread_rank() == 0) init(&bar, block.size());
    block.sync();
    cuda::memcpy_async(block, tile, a + blockIdx.x * blockDim.x, sizeof(float) * blockDim.x, bar);
    bar.arrive_and_wait();
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    c[i] = tile[blockDim.x - 1 - t] * 2.f + b[i];
}""",
    # recursion on the fiber stacks, across a barrier; half conversions and arithmetic
    "fib_half": r"""
#include <cuda_fp16.h>
__device__ __noinline__ int fib(int x) { return x < 2 ? x : fib(x - 1) + fib(x - 2); }
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int f = fib(i % 13);
    __syncthreads();
    __half h = __hadd(__hmul(__float2half(a[i]), __float2half(b[i])), __float2half(0.25f));
    c[i] = (float)f + __half2float(h) + __half2float(__float2half(1.0f / 3.0f));
}""",
    # a cooperative launch: every block resident on one worker, phases met by grid.sync, each
    # block's shared memory its own
    "grid": r"""
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    cg::grid_group g = cg::this_grid();
    __shared__ float mine;
    const int i = (int)g.thread_rank();
    if (threadIdx.x == 0) mine = (float)blockIdx.x;
    c[i] = a[i] * b[i];
    g.sync();
    const float v = c[(i + blockDim.x) % n];
    g.sync();
    c[i] = v + mine;
}""",
    # atomics, global and shared: a histogram of a by value, weighted by b
    "atomics": r"""
extern "C" __global__ void k(const float* a, const float* b, float* c, int n) {
    __shared__ unsigned int hist[8];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (threadIdx.x < 8) hist[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&hist[(int)a[i]], (unsigned int)b[i]);
    atomicAdd(&c[(int)a[i]], b[i]);
    __syncthreads();
    if (threadIdx.x < 8) atomicAdd(&c[8 + threadIdx.x], (float)atomicCAS(&hist[threadIdx.x], 0u, 0u));
}""",
}


def expected(name: str) -> np.ndarray:
    i = np.arange(N)
    a, b = (i % 7).astype(np.float32), (i % 3).astype(np.float32)
    blocks = (a * b).reshape(-1, BLOCK).sum(axis=1, dtype=np.float64).astype(np.float32)
    if name == "reduce":
        out = np.zeros(N, np.float32)
        out[:len(blocks)] = blocks
        return out
    if name == "shfl":
        return np.repeat(blocks, BLOCK) + a * b * np.float32(0.5)
    if name == "barrier":
        rev = a.reshape(-1, BLOCK)[:, ::-1].reshape(-1)
        return rev * np.float32(2) + b
    if name == "grid":
        return np.roll(a * b, -BLOCK) + (i // BLOCK).astype(np.float32)
    if name == "atomics":
        out = np.zeros(N, np.float32)
        for v in range(7):
            out[v] = out[8 + v] = b[a == v].sum()
        return out
    fib = [0, 1]
    while len(fib) < 13:
        fib.append(fib[-1] + fib[-2])
    third = np.float32(np.float16(1.0 / 3.0))
    return (np.array(fib, np.float32)[i % 13] + (a * b + np.float32(0.25))) + third


ARCHS = {   # arch -> (its g++, how to run its programs here)
    "x86_64": ("x86_64-linux-gnu-g++", "qemu-x86_64-static"),
    "aarch64": ("aarch64-linux-gnu-g++", "qemu-aarch64-static"),
    "riscv64": ("riscv64-linux-gnu-g++", "qemu-riscv64-static"),
}


def toolchain(arch: str) -> tuple[str, list[str]]:
    cxx, qemu = ARCHS[arch]
    native = platform.machine() == arch
    compiler = shutil.which(cxx) or (shutil.which("g++") if native else None)
    if compiler is None:
        pytest.skip(f"no {cxx} (Debian: apt install g++-{arch.replace('_', '-')}-linux-gnu)")
    if native:
        return compiler, []
    if shutil.which(qemu) is None:
        pytest.skip(f"no {qemu} (Debian: apt install qemu-user-static)")
    return compiler, [qemu]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    out = {}
    d = tmp_path_factory.mktemp("fiber-arch")
    for name, src in KERNELS.items():
        text = nvrtc.to_ptx(src, list(options.parse_options(()).args), deadline=time.monotonic() + 120,
                            memory_limit_bytes=2 << 30, cwd=str(d))
        path = d / f"{name}.cc"
        path.write_text(ptx.to_cpp(text))
        out[name] = str(path)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fiber_switch_on_each_architecture(arch, sources, tmp_path):
    compiler, runner = toolchain(arch)
    for name, tu in sources.items():
        so = str(tmp_path / f"{name}.{arch}.so")
        r = subprocess.run(build.link_argv(compiler, tu, so, std="c++17", machine=arch),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{arch} {name}: {r.stderr[-3000:]}"
        build.check_load_time_code(so)          # what loading it on that machine checks first
        exe = str(tmp_path / f"{name}.{arch}")
        r = subprocess.run([compiler, "-std=c++17", "-static", *build._cxx_flags(arch), "-o", exe, DRIVER, tu,
                            "-ldl"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{arch} {name}: {r.stderr[-3000:]}"
        r = subprocess.run([*runner, exe, str(N), str(BLOCK), *(["coop"] if name == "grid" else [])],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{arch} {name}: exit {r.returncode}: {r.stderr[-2000:]}"
        got = np.array([float.fromhex(x) for x in r.stdout.split()], np.float32)
        np.testing.assert_array_equal(got, expected(name), err_msg=f"{arch} {name}")


def test_outline_atomics_would_be_load_time_code(sources, tmp_path):
    """Why modules for arm64 are built with -mno-outline-atomics: without it gcc links
    libgcc's CPU-feature constructor into a module that uses atomics, and it is refused."""
    compiler, _ = toolchain("aarch64")
    so = str(tmp_path / "atomics.outline.so")
    argv = [a for a in build.link_argv(compiler, sources["atomics"], so, std="c++17", machine="aarch64")
            if a != "-mno-outline-atomics"]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    with pytest.raises(UnsupportedConstructError, match="loaded or unloaded"):
        build.check_load_time_code(so)
