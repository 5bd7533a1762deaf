"""kubecash.broker.cpukernels: real NVRTC and g++ compiles, real launches, results checked with numpy."""
from __future__ import annotations

import ctypes
import re
import struct
import subprocess
import time

import numpy as np
import pytest
from conftest import SANDBOX, needs_landlock

from kubecash.broker import cpukernels as ck
from kubecash.broker.cpukernels.elfcheck import check_load_time_code
from kubecash.broker.cpukernels.launch import _pack_args
from kubecash.client.errors import CudaError, E


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cpukernels-cache")


@pytest.fixture(scope="module")
def launcher():
    with ck.Launcher(2, sandbox=SANDBOX) as lz:
        yield lz


@pytest.fixture(scope="module")
def compile(cache_dir):
    modules = []

    def _compile(src: str, options=()):
        m = ck.compile_module(src, options, cache_dir=cache_dir)
        modules.append(m)
        return m
    yield _compile
    for m in modules:
        m.close()


def ptr(a: np.ndarray) -> bytes:
    return a.ctypes.data.to_bytes(8, "little")


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def f32(v: float) -> bytes:
    return struct.pack("<f", v)


VECADD = r"""
#include <cuda_runtime.h>   // a header of the CUDA include directories: NVRTC reads it
#include "cuda/std/cstdint"
extern "C" __global__ void vadd(const float* __restrict__ a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
"""


def test_vector_add(compile, launcher):
    m = compile(VECADD)
    k = m.kernel("vadd")
    assert k.param_sizes == (8, 8, 8, 4) and k.param_aligns == (8, 8, 8, 4)
    assert not k.cooperative  # no __syncthreads: plain loop over a block's threads
    n = 100_003               # a partial last block
    rng = np.random.default_rng(1)
    a, b = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    c = np.full(n, -1.0, np.float32)
    launcher.launch(m, k, ((n + 255) // 256, 1, 1), (256, 1, 1), 0, [ptr(a), ptr(b), ptr(c), i32(n)])
    np.testing.assert_array_equal(c, a + b)


def test_saxpy(compile, launcher):
    m = compile(r"""
    extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned long long n) {
        unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] = a * x[i] + y[i];
    }""")
    n = 5000
    x = np.arange(n, dtype=np.float32)
    y = np.ones(n, np.float32)
    expect = 2.5 * x + y
    launcher.launch(m, m.kernel("saxpy"), (40, 1, 1), (128, 1, 1), 0,
                    [f32(2.5), ptr(x), ptr(y), struct.pack("<Q", n)])
    np.testing.assert_allclose(y, expect, rtol=1e-6)


def test_grid_2d(compile, launcher):
    m = compile(r"""
    extern "C" __global__ void scale2d(const double* in, double* out, int rows, int cols, double k) {
        int c = blockIdx.x * blockDim.x + threadIdx.x;
        int r = blockIdx.y * blockDim.y + threadIdx.y;
        if (r < rows && c < cols) out[r * cols + c] = in[r * cols + c] * k + r - c;
    }""")
    rows, cols = 37, 53
    a = np.random.default_rng(2).random((rows, cols))
    out = np.zeros_like(a)
    launcher.launch(m, m.kernel("scale2d"), ((cols + 15) // 16, (rows + 7) // 8, 1), (16, 8, 1), 0,
                    [ptr(a), ptr(out), i32(rows), i32(cols), struct.pack("<d", 3.0)])
    r, c = np.indices((rows, cols))
    np.testing.assert_allclose(out, a * 3.0 + r - c)


def test_scalars_of_every_width(compile, launcher):
    m = compile(r"""
    #include <cuda/std/cstdint>
    using namespace cuda::std;
    extern "C" __global__ void widths(int8_t a, uint8_t b, int16_t c, uint16_t d, int32_t e,
                                      uint32_t f, int64_t g, uint64_t h, float x, double y,
                                      char z, int64_t* si, uint64_t* ui, double* fl) {
        si[0] = a; si[1] = c; si[2] = e; si[3] = g; si[4] = z;
        ui[0] = b; ui[1] = d; ui[2] = f; ui[3] = h;
        fl[0] = x; fl[1] = y;
    }""")
    k = m.kernel("widths")
    assert k.param_sizes == (1, 1, 2, 2, 4, 4, 8, 8, 4, 8, 1, 8, 8, 8)
    si, ui, fl = np.zeros(5, np.int64), np.zeros(4, np.uint64), np.zeros(2)
    args = [struct.pack("<b", -128), struct.pack("<B", 255), struct.pack("<h", -32768),
            struct.pack("<H", 65535), struct.pack("<i", -2**31), struct.pack("<I", 2**32 - 1),
            struct.pack("<q", -2**63), struct.pack("<Q", 2**64 - 1), f32(1.5e-3),
            struct.pack("<d", np.pi), b"\x7f", ptr(si), ptr(ui), ptr(fl)]
    launcher.launch(m, k, (1, 1, 1), (1, 1, 1), 0, args)
    assert si.tolist() == [-128, -32768, -2**31, -2**63, 127]
    assert ui.tolist() == [255, 65535, 2**32 - 1, 2**64 - 1]
    assert fl[0] == np.float32(1.5e-3) and fl[1] == np.pi


def test_struct_by_value(compile, launcher):
    m = compile(r"""
    struct Params { float scale; int offset; double bias; char tag; };   // 24 bytes, align 8
    struct __align__(16) Pair { int a, b; };                             // 16 bytes, align 16
    extern "C" __global__ void affine(Params p, const float* x, double* y, Pair q, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] = x[i] * p.scale + p.offset + p.bias + p.tag + q.a * q.b;
    }""")
    k = m.kernel("affine")
    assert k.param_sizes == (24, 8, 8, 16, 4) and k.param_aligns == (8, 8, 8, 16, 4)
    n = 1000
    x = np.linspace(0, 1, n, dtype=np.float32)
    y = np.zeros(n)
    params = struct.pack("<fid c7x", 2.0, 7, 0.25, b"\x03")
    assert len(params) == 24
    launcher.launch(m, k, (8, 1, 1), (128, 1, 1), 0,
                    [params, ptr(x), ptr(y), struct.pack("<ii8x", 5, 6), i32(n)])
    np.testing.assert_allclose(y, x.astype(np.float64) * 2.0 + 7 + 0.25 + 3 + 30, rtol=1e-6)


REDUCE_STATIC = r"""
extern "C" __global__ void __launch_bounds__(256) reduce(const float* in, float* out, unsigned n) {
    __shared__ float s[256];
    unsigned tid = threadIdx.x;
    unsigned i = blockIdx.x * blockDim.x + tid;
    s[tid] = i < n ? in[i] : 0.0f;
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (tid < k) s[tid] += s[tid + k];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = s[0];
}"""

REDUCE_EXTERN = r"""
static __device__ float load(const float* p, unsigned i, unsigned n) { return i < n ? p[i] : 0.0f; }
extern "C" __global__ void reduce_dyn(const float* in, float* out, unsigned n) {
    extern __shared__ __align__(16) float sdata[];
    unsigned tid = threadIdx.x;
    sdata[tid] = load(in, blockIdx.x * blockDim.x + tid, n);
    __syncthreads();
    for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
        if (tid < k) sdata[tid] += sdata[tid + k];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = sdata[0];
}"""


@pytest.mark.parametrize("src,name,shared", [(REDUCE_STATIC, "reduce", 0),
                                             (REDUCE_EXTERN, "reduce_dyn", 128 * 4)])
def test_shared_memory_reduction(compile, launcher, src, name, shared):
    m = compile(src)
    k = m.kernel(name)
    assert k.cooperative  # __syncthreads: the block's threads run as fibers
    block = 256 if name == "reduce" else 128
    n = 300_000
    x = np.random.default_rng(3).random(n, dtype=np.float32)
    nb = (n + block - 1) // block
    out = np.zeros(nb, np.float32)
    launcher.launch(m, k, (nb, 1, 1), (block, 1, 1), shared, [ptr(x), ptr(out), u32(n)])
    padded = np.zeros(nb * block, np.float32)
    padded[:n] = x
    np.testing.assert_allclose(out, padded.reshape(nb, block).sum(axis=1, dtype=np.float64), rtol=1e-5)


def test_barrier_semantics_2d_block(compile, launcher):
    """Every thread sees every other thread's write after the barrier (a tile transpose),
    threads that returned early do not block it, and __syncthreads_count counts."""
    m = compile(r"""
    extern "C" __global__ void transpose(const int* in, int* out, int* counts) {
        __shared__ int tile[8][9];
        int x = threadIdx.x, y = threadIdx.y;
        tile[y][x] = in[(blockIdx.x * 8 + y) * 8 + x];
        int c = __syncthreads_count(tile[y][x] % 2 == 0);
        out[(blockIdx.x * 8 + y) * 8 + x] = tile[x][y];
        if (x == 0 && y == 0) counts[blockIdx.x] = c;
        if (y > 3) return;
        __syncthreads();
        out[(blockIdx.x * 8 + y) * 8 + x] += 1000;
    }""")
    inp = np.arange(3 * 64, dtype=np.int32)
    out = np.zeros_like(inp)
    counts = np.zeros(3, np.int32)
    launcher.launch(m, m.kernel("transpose"), (3, 1, 1), (8, 8, 1), 0, [ptr(inp), ptr(out), ptr(counts)])
    expect = inp.reshape(3, 8, 8).transpose(0, 2, 1).copy()
    expect[:, :4, :] += 1000
    np.testing.assert_array_equal(out.reshape(3, 8, 8), expect)
    assert counts.tolist() == [32, 32, 32]


def test_atomics_across_blocks(compile, launcher):
    m = compile(r"""
    extern "C" __global__ void acc(const float* x, float* fsum, int* count, unsigned long long* usum,
                                   int* mx, unsigned* ring, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n) return;
        atomicAdd(fsum, x[i]);
        atomicAdd(count, 1);
        atomicAdd(usum, (unsigned long long)i);
        atomicMax(mx, i);
        atomicInc(ring, 9u);
    }""")
    n = 200_000
    x = np.full(n, 0.5, np.float32)  # exact in float whatever the order
    fsum, count = np.zeros(1, np.float32), np.zeros(1, np.int32)
    usum, mx, ring = np.zeros(1, np.uint64), np.full(1, -1, np.int32), np.zeros(1, np.uint32)
    launcher.launch(m, m.kernel("acc"), ((n + 127) // 128, 1, 1), (128, 1, 1), 0,
                    [ptr(x), ptr(fsum), ptr(count), ptr(usum), ptr(mx), ptr(ring), i32(n)])
    assert count[0] == n            # a lost update between the two workers would show here
    assert fsum[0] == n * 0.5
    assert usum[0] == n * (n - 1) // 2
    assert mx[0] == n - 1
    assert ring[0] == n % 10


def test_cpp_kernels_by_their_mangled_names_as_on_a_gpu(compile, launcher):
    m = compile(r"""
    __global__ void scale(float* x, float k) { x[threadIdx.x] *= k; }
    namespace ns { __global__ void twice(int* p) { p[threadIdx.x] *= 2; } }
    template <typename T> __global__ void fill(T* p, T v) { p[threadIdx.x] = v; }
    template __global__ void fill<double>(double*, double);
    """)
    k = m.kernel("_Z5scalePff")
    assert k.name == "_Z5scalePff" and m.kernel("_ZN2ns5twiceEPi").name == "_ZN2ns5twiceEPi"
    x = np.arange(32, dtype=np.float32)
    launcher.launch(m, k, (1, 1, 1), (32, 1, 1), 0, [ptr(x), f32(3.0)])
    np.testing.assert_array_equal(x, np.arange(32) * 3.0)
    d = np.zeros(8)
    launcher.launch(m, m.kernel("_Z4fillIdEvPT_S0_"), (1, 1, 1), (8, 1, 1), 0,
                    [ptr(d), struct.pack("<d", 2.5)])
    assert d.tolist() == [2.5] * 8
    with pytest.raises(KeyError, match="scale"):      # cuModuleGetFunction wants the symbol
        m.kernel("scale")


GLOBALS = r"""
__device__ float table[16];
__constant__ int bias = 5;
extern "C" __global__ void lookup(const int* idx, float* out) {
    out[threadIdx.x] = table[idx[threadIdx.x]] + bias;
}"""


def test_global_symbol(compile, launcher):
    m = compile(GLOBALS)
    addr, size = m.global_symbol("table")
    assert size == 16 * 4 and addr
    assert m.global_symbol("bias")[1] == 4
    assert ctypes.c_int.from_address(m.global_symbol("bias")[0]).value == 5
    vals = np.arange(16, dtype=np.float32) * 10
    ctypes.memmove(addr, vals.ctypes.data, size)          # what cudaMemcpyToSymbol does
    idx = np.array([3, 0, 15, 7], np.int32)
    out = np.zeros(4, np.float32)
    launcher.launch(m, m.kernel("lookup"), (1, 1, 1), (4, 1, 1), 0, [ptr(idx), ptr(out)])
    np.testing.assert_array_equal(out, vals[idx] + 5)
    with pytest.raises(KeyError):
        m.global_symbol("missing")


def test_cache_hit_runs_no_compiler_and_instances_are_private(compile):
    first = compile(GLOBALS)       # compiled (or cached) by the previous test
    runs = ck.stats.compiler_runs
    hits = ck.stats.cache_hits
    t0 = time.perf_counter()
    again = compile(GLOBALS)
    elapsed = time.perf_counter() - t0
    assert ck.stats.compiler_runs == runs and ck.stats.cache_hits == hits + 1
    # Each load is its own instance: its own __device__ memory.
    assert again.global_symbol("table")[0] != first.global_symbol("table")[0]
    # A different option is a different module: the compiler runs.
    t0 = time.perf_counter()
    compile(GLOBALS, ["-DUNUSED=1", "-arch=sm_80", "-lineinfo", "-std=c++17"])
    compiled = time.perf_counter() - t0
    assert ck.stats.compiler_runs > runs
    # Against the compile measured here, not a fixed time (a loaded machine slows both).
    assert elapsed < compiled / 2, (elapsed, compiled)


def test_compile_error_has_log_with_line(cache_dir):
    src = 'extern "C" __global__ void k(int* p) {\n    p[0] = 1;\n    p[1] = undefined_thing;\n}\n'
    with pytest.raises(ck.KernelCompileError) as e:
        ck.compile_module(src, cache_dir=cache_dir)
    assert not isinstance(e.value, ck.UnsupportedConstructError)
    assert "kernel.cu(3): error" in e.value.log and "undefined_thing" in e.value.log
    assert e.value.code == E.CUDA_ERROR_INVALID_SOURCE


@pytest.mark.parametrize("option", ["-I/etc", "--include-path=/etc", "-include=/etc/passwd", "-rdc=true",
                                    "-time=/tmp/t", "-arch=compute_50", "-dlto", "-Uname=1"])
def test_options_that_read_files_or_leave_ptx_are_refused(cache_dir, option):
    runs = ck.stats.compiler_runs
    with pytest.raises(ck.KernelCompileError, match=re.escape(option.split("=")[0])):
        ck.compile_module(VECADD, [option], cache_dir=cache_dir)
    assert ck.stats.compiler_runs == runs


@pytest.mark.parametrize("src,construct", [
    ("#include <stdio_ext.h>\n", "stdio_ext.h"),
    ('#include "/etc/passwd"\n', "/etc/passwd"),
    ("#define H <stdio.h>\n#include H\n", "#include H"),
    ("%:include <fenv.h>\n", "fenv.h"),                       # digraph
    ("#inc\\\nlude <fenv.h>\n", "fenv.h"),                    # line continuation
    ("# /* sneaky */ include <fenv.h>\n", "fenv.h"),          # comment between # and keyword
    ("int x;\r#include <fenv.h>\n", "fenv.h"),                # a lone CR ends a line for g++
    ("#define A /*\n*/ 1\n/* x */ # include <fenv.h>\n", "fenv.h"),
    ('const char* s = R"x(\n#include <fenv.h>\n)x";\n', "raw string literal"),
    ("#include <cuda/../../../../../../etc/passwd>\n", "etc/passwd"),   # out of the CUDA include dirs
    ("#include <stdio.h>\n", "stdio.h"),                                 # NVRTC has none either
    ('#define P _Pragma("GCC dependency \\"/etc/passwd\\"")\nP\n', "#pragma GCC dependency"),
    ("#if __has_include(</etc/passwd>)\n#endif\n", "__has_include"),
])
def test_includes_are_refused_without_running_the_compiler(cache_dir, src, construct):
    runs = ck.stats.compiler_runs
    with pytest.raises(ck.UnsupportedConstructError) as e:
        ck.compile_module(src + VECADD, cache_dir=cache_dir)
    assert construct in e.value.construct
    assert ck.stats.compiler_runs == runs


def test_include_text_in_comments_and_strings_is_not_a_directive(compile, launcher):
    m = compile('/*\n#include <fenv.h>\n*/\n__device__ const char* s = "#include <fenv.h>";\n// #include <x>\n'
                + VECADD)
    assert "vadd" in m.kernels


HALF_AND_WARPS = r"""
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;
template <typename T> __device__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void k(const float* x, float* sums, float* halves, int* tiles) {
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    float s = warp_sum(v);
    if ((threadIdx.x & 31) == 0) sums[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = s;
    halves[threadIdx.x] = __half2float(__hmul(__float2half(v), __float2half(0.5f)));
    auto tile = cg::tiled_partition<8>(cg::this_thread_block());
    int t = cg::reduce(tile, (int)threadIdx.x, cg::plus<int>());
    if (tile.thread_rank() == 0) tiles[threadIdx.x / 8] = t;
    __syncwarp();
    asm volatile("membar.cta;");
}"""


def test_cuda_headers_warp_intrinsics_templates_and_inline_asm_compile_through_nvrtc(compile, launcher):
    """What the hand-written front end refused, NVRTC compiles and the PTX path runs."""
    m = compile(HALF_AND_WARPS)
    assert m.kernel("k").cooperative      # warp operations: lanes run as fibers
    x = (np.arange(128, dtype=np.float32) % 7) - 3
    sums, halves, tiles = np.zeros(4, np.float32), np.zeros(64, np.float32), np.zeros(8, np.int32)
    launcher.launch(m, m.kernel("k"), (2, 1, 1), (64, 1, 1), 0, [ptr(x), ptr(sums), ptr(halves), ptr(tiles)])
    np.testing.assert_array_equal(sums, x.reshape(4, 32).sum(axis=1))
    np.testing.assert_array_equal(tiles, np.arange(64).reshape(8, 8).sum(axis=1))
    assert set(halves.tolist()) <= set((x * 0.5).tolist())


def test_a_texture_fetch_is_refused_naming_the_instruction(cache_dir):
    src = ('extern "C" __global__ void k(cudaTextureObject_t t, float* o) '
           "{ o[threadIdx.x] = tex1Dfetch<float>(t, threadIdx.x); }\n")
    with pytest.raises(ck.UnsupportedConstructError) as e:
        ck.compile_module(src, cache_dir=cache_dir)
    assert "tex" in e.value.construct and "PTX line" in e.value.construct


def test_bad_launch_arguments_raise_before_running(compile, launcher):
    m = compile(r"""extern "C" __global__ void mark(int* p) { p[0] = 7; }""")
    k = m.kernel("mark")
    p = np.zeros(1, np.int32)
    good = [ptr(p)]
    bad = [
        dict(args=[]),                                  # wrong count
        dict(args=[ptr(p), i32(1)]),                    # wrong count
        dict(args=[i32(1)]),                            # wrong size
        dict(block=(2048, 1, 1)),                       # > 1024 threads
        dict(block=(32, 32, 2)),                        # 2048 threads
        dict(block=(1, 1, 65)),                         # z > 64
        dict(grid=(0, 1, 1)),
        dict(grid=(1, 65536, 1)),
        dict(shared=64 * 1024),                         # > 48 KiB
    ]
    for case in bad:
        with pytest.raises(ValueError):
            launcher.launch(m, k, case.get("grid", (1, 1, 1)), case.get("block", (1, 1, 1)),
                            case.get("shared", 0), case.get("args", good))
        assert p[0] == 0, case
    launcher.launch(m, k, (1, 1, 1), (1, 1, 1), 48 * 1024, good)
    assert p[0] == 7


def test_close_is_idempotent_and_closed_module_refuses_launches(compile):
    m = compile(r"""extern "C" __global__ void nop() {}""")
    assert m.kernel("nop").param_sizes == ()
    with ck.Launcher(1, sandbox=SANDBOX) as lz:
        lz.launch(m, m.kernel("nop"), (3, 1, 1), (5, 1, 1), 0, [])
        m.close()
        m.close()
        with pytest.raises(ValueError):
            lz.launch(m, m.kernel("nop"), (1, 1, 1), (1, 1, 1), 0, [])
    lz.close()


def test_arguments_are_copied_into_aligned_storage():
    # x86 forgives misaligned loads, so check the packing itself.
    info = ck.KernelInfo("k", "k", (1, 16, 2, 8, 4, 64), (1, 16, 2, 8, 4, 64), False)
    blobs = [bytes([i]) * s for i, s in enumerate(info.param_sizes)]
    keep, argv = _pack_args(info, blobs)
    for i, (size, align) in enumerate(zip(info.param_sizes, info.param_aligns, strict=False)):
        assert argv[i] % align == 0
        assert ctypes.string_at(argv[i], size) == blobs[i]


def test_a_grid_runs_in_slices_of_blocks(cache_dir):
    """A preemptible launch runs block ranges [first, last): together they are the kernel."""
    src = 'extern "C" __global__ void mark(int* o) { o[blockIdx.x * blockDim.x + threadIdx.x] = blockIdx.x + 1; }'
    mod = ck.compile_module(src, cache_dir=cache_dir)
    k = mod.kernel("mark")
    out = np.zeros(10 * 32, np.int32)
    with ck.Launcher(2, sandbox=SANDBOX) as L:
        L.launch(mod, k, (10, 1, 1), (32, 1, 1), 0, [ptr(out)], first_block=0, last_block=3)
        assert np.array_equal(out[:96], np.repeat(np.arange(1, 4), 32)) and not out[96:].any()
        L.launch(mod, k, (10, 1, 1), (32, 1, 1), 0, [ptr(out)], first_block=3, last_block=10)
        with pytest.raises(ValueError, match="block range"):
            L.launch(mod, k, (10, 1, 1), (32, 1, 1), 0, [ptr(out)], first_block=5, last_block=11)
    assert np.array_equal(out, np.repeat(np.arange(1, 11), 32))


def test_loading_and_launching_leave_nothing_for_the_cyclic_gc(cache_dir):
    """An executor loads modules and launches kernels all day. What that leaves in reference
    cycles waits for the full collection, which comes rarely: a ctypes.CDLL per module (a
    new class each) made executors' memory creep by megabytes between collections."""
    import gc
    src = 'extern "C" __global__ void inc(int* o) { o[threadIdx.x] += 1; }'
    out = np.zeros(32, np.int32)
    ck.compile_module(src, cache_dir=cache_dir).close()     # compiled and cached
    with ck.Launcher(2, sandbox=SANDBOX) as L:
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                with ck.compile_module(src, cache_dir=cache_dir) as m:
                    L.launch(m, m.kernel("inc"), (1, 1, 1), (32, 1, 1), 0, [ptr(out)])
            garbage = gc.collect()
        finally:
            gc.enable()
    assert np.array_equal(out, np.full(32, 50, np.int32))
    assert garbage < 50, f"{garbage} objects in reference cycles after 50 loads and launches"


def test_the_gpu_backend_compiles_the_same_source_under_the_same_checks():
    """GPU executors run NVRTC as root with the host's view: the same option and include
    checks as the CPU backend's keep it from reading host files for a tenant. (NVRTC needs no
    GPU: the CUBIN is made here.)"""
    pytest.importorskip("cuda.bindings.nvrtc")
    from kubecash.broker.backend_cuda import CudaBackend
    b = CudaBackend.__new__(CudaBackend)     # no device: only the compile is exercised
    b.arch = "sm_80"
    assert b._nvrtc(HALF_AND_WARPS, ["-DX=1", "--use_fast_math"])[:4] == b"\x7fELF"
    for src, opts in (('#include "/etc/passwd"\n' + VECADD, []), (VECADD, ["-I/etc"]), (VECADD, ["-include=/etc/x"])):
        with pytest.raises(CudaError) as e:
            b._nvrtc(src, opts)
        assert "/etc" in e.value.message


@pytest.mark.parametrize("src, options", [
    # A tenant's macro names the file an allowed header includes (CCCL: #include MACRO).
    ('#define THRUST_MR_STD_MR_HEADER "/etc/passwd"\n#include <thrust/mr/memory_resource.h>\n' + VECADD, []),
    ("??=include \"/etc/passwd\"\n" + VECADD, ["-std=c++14"]),              # a trigraph for '#'
    ("int x = 0'a/*';\n#include \"/etc/passwd\"\n/* */\n" + VECADD, ["-std=c++11"]),  # no digit separators
    ('#if X\n#error exists\n#endif\n' + VECADD, ['-DX=__has_include("/etc/passwd")']),
])
@needs_landlock
def test_nvrtc_reads_no_host_file_however_it_is_asked(cache_dir, src, options):
    """Found by an attacker review: each made NVRTC read a host file (and print its first
    line in the log) or probe one. The directive check refuses what it can see; NVRTC's
    Landlock ruleset (nvrtc.py) refuses the file where it cannot."""
    with pytest.raises(ck.KernelCompileError) as e:
        ck.compile_module(src, options, cache_dir=cache_dir)
    assert "root:" not in e.value.log and "exists" not in e.value.message, e.value.log


def test_without_landlock_or_a_view_cuda_c_is_refused_not_compiled_unconfined(cache_dir, monkeypatch):
    from kubecash.broker.cpukernels import nvrtc
    monkeypatch.setattr(nvrtc, "_landlock", lambda readable: False)   # a kernel without Landlock
    monkeypatch.setattr(nvrtc, "in_view", False)
    with pytest.raises(ck.KernelCompileError, match="no Landlock") as e:
        ck.compile_module(VECADD + "// unconfined\n", cache_dir=cache_dir)
    assert e.value.code == E.CUDA_ERROR_NOT_SUPPORTED


def test_a_cached_module_with_load_time_code_is_rebuilt_not_loaded(cache_dir, launcher, tmp_path):
    """What dlopen maps is checked every time, not only after a build: a cache entry changed
    since (or made by an older build: arm64's outline-atomics constructor) with code of its
    own to run at load is refused by the loader and rebuilt by compile_module."""
    src = 'extern "C" __global__ void k(int* p) { p[0] = 7; }\n'
    with ck.compile_module(src, cache_dir=cache_dir):
        pass
    entry = max(cache_dir.glob("*.so"), key=lambda p: p.stat().st_mtime)
    c = tmp_path / "ctor.c"
    marker = tmp_path / "ran"
    c.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) {'
                 f' fopen("{marker}", "w"); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(entry), str(c)], check=True)
    with pytest.raises(ck.UnsupportedConstructError, match="loaded or unloaded"):
        ck.CompiledModule._load_image(entry.read_bytes(), tmp_path)
    with pytest.raises(ck.KernelCompileError, match="not a 64-bit"):
        ck.CompiledModule._load_image(b"\x7fELF" + bytes(10), tmp_path)
    runs = ck.stats.compiler_runs
    check_load_time_code(ck.build_module(src, cache_dir=cache_dir))   # what the executor reads
    with ck.compile_module(src, cache_dir=cache_dir) as m:
        out = np.zeros(1, np.int32)
        launcher.launch(m, m.kernel("k"), (1, 1, 1), (1, 1, 1), 0, [ptr(out)])
        assert out[0] == 7
    assert ck.stats.compiler_runs == runs + 1
    assert not marker.exists()
