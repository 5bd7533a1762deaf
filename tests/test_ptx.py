"""The CPU backend runs PTX (#18, first part): NVRTC's output for CUDA C kernels, and
hand-written PTX for single instructions, loaded as PTX images through the client library,
each checked against numpy. What the translator does not run is refused by name and line."""
from __future__ import annotations

import subprocess
import time
from fractions import Fraction

import numpy as np
import pytest
from conftest import run_client
from toolkit import NVCC, needs_nvcc

import kubecash.client as kc
from kubecash.broker.cpukernels.nvrtc import include_dirs as cuda_include_dirs
from kubecash.client.errors import E

try:
    from cuda.bindings import nvrtc
except ImportError:     # cuda-python has no riscv64 build: the hand-written PTX tests still run
    nvrtc = None


def nvrtc_ptx(src: str, *options: str) -> bytes:
    """CUDA C to PTX with NVRTC (no GPU needed), as a program hands it to cuModuleLoadData."""
    if nvrtc is None:
        pytest.skip("needs NVRTC through cuda-python (pip cuda-python: x86-64 and aarch64 builds only)")
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"corpus.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        opts = [b"--gpu-architecture=compute_80", *(o.encode() for o in options),
                *(f"--include-path={d}".encode() for d in cuda_include_dirs())]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, log)
            pytest.fail(f"NVRTC: {log.decode()}")
        _, n = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * n
        nvrtc.nvrtcGetPTX(prog, ptx)
        return ptx                      # NUL-terminated, as NVRTC gives it
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def load(dev, src: str, *options: str):
    return dev.load_module(image=nvrtc_ptx(src, *options), kind="ptx")


@pytest.fixture
def dev(session, dev_name):
    return session.device(dev_name)


def test_elementwise_kernels_from_nvrtc(dev):
    m = load(dev, r"""
        extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) y[i] = a * x[i] + y[i];
        }
        extern "C" __global__ void daxpy2d(double a, const double* x, double* y, int w, int h) {
            int c = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y * blockDim.y + threadIdx.y;
            if (c < w && r < h) y[r * w + c] = fma(a, x[r * w + c], y[r * w + c]) / 3.0 + sqrt(x[r * w + c]);
        }""")
    n = 10_000
    rng = np.random.default_rng(1)
    x, y = rng.random(n, np.float32), rng.random(n, np.float32)
    with dev.allocate(x.nbytes) as dx, dev.allocate(y.nbytes) as dy:
        dx.copy_from(x)
        dy.copy_from(y)
        dev.launch(m.get_kernel("saxpy"), ((n + 127) // 128,), (128,), [np.float32(2.5), dx, dy, np.int32(n)])
        np.testing.assert_allclose(dy.copy_to(np.empty_like(y)), np.float32(2.5) * x + y, rtol=1e-6)
    w, h = 37, 19
    X, Y = rng.random((h, w)), rng.random((h, w))
    with dev.allocate(X.nbytes) as dx, dev.allocate(Y.nbytes) as dy:
        dx.copy_from(X)
        dy.copy_from(Y)
        dev.launch(m.get_kernel("daxpy2d"), (3, 3), (16, 8), [np.float64(1.5), dx, dy, np.int32(w), np.int32(h)])
        np.testing.assert_allclose(dy.copy_to(np.empty_like(Y)), (1.5 * X + Y) / 3.0 + np.sqrt(X), rtol=1e-15)


def test_shared_memory_reduction_with_barriers_and_atomics(dev):
    m = load(dev, r"""
        __device__ float scale = 2.0f;
        extern "C" __global__ void reduce(const float* in, float* out, int n) {
            __shared__ float s[256];
            int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
            s[t] = i < n ? in[i] * scale : 0.f;
            __syncthreads();
            for (int k = blockDim.x / 2; k > 0; k >>= 1) {
                if (t < k) s[t] += s[t + k];
                __syncthreads();
            }
            if (t == 0) atomicAdd(out, s[0]);
        }
        extern "C" __global__ void scan(const int* in, int* out) {   // inclusive, one block
            extern __shared__ int buf[];
            int t = threadIdx.x;
            buf[t] = in[t];
            __syncthreads();
            for (int off = 1; off < blockDim.x; off <<= 1) {
                int v = t >= off ? buf[t - off] : 0;
                __syncthreads();
                buf[t] += v;
                __syncthreads();
            }
            out[t] = buf[t];
        }""")
    n = 5000
    a = np.arange(n, dtype=np.float32) % 7
    with dev.allocate(a.nbytes) as da, dev.allocate(4) as out:
        da.copy_from(a)
        out.copy_from(np.zeros(1, np.float32))
        dev.launch(m.get_kernel("reduce"), ((n + 255) // 256,), (256,), [da, out, np.int32(n)])
        assert out.copy_to(np.empty(1, np.float32))[0] == 2 * a.sum()
    v = np.random.default_rng(2).integers(-100, 100, 512).astype(np.int32)
    with dev.allocate(v.nbytes) as dv, dev.allocate(v.nbytes) as do:
        dv.copy_from(v)
        dev.launch(m.get_kernel("scan"), (1,), (512,), [dv, do], shared_mem=512 * 4)
        np.testing.assert_array_equal(do.copy_to(np.empty_like(v)), np.cumsum(v))


def test_atomics_histograms_global_and_shared(dev):
    m = load(dev, r"""
        extern "C" __global__ void hist(const unsigned char* data, int n, unsigned int* bins,
                                        unsigned int* maxv, int* cas_hits) {
            __shared__ unsigned int local[16];
            if (threadIdx.x < 16) local[threadIdx.x] = 0;
            __syncthreads();
            for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
                atomicAdd(&local[data[i] & 15], 1u);
                atomicMax(maxv, (unsigned int)data[i]);
            }
            __syncthreads();
            if (threadIdx.x < 16) atomicAdd(&bins[threadIdx.x], local[threadIdx.x]);
            if (atomicCAS(cas_hits, 0, 1) == 0) atomicExch(cas_hits + 1, (int)blockIdx.x + 1);
        }""")
    data = np.random.default_rng(3).integers(0, 256, 20_000).astype(np.uint8)
    with dev.allocate(data.nbytes) as dd, dev.allocate(64) as bins, dev.allocate(4) as mx, \
            dev.allocate(8) as cas:
        dd.copy_from(data)
        bins.copy_from(np.zeros(16, np.uint32))
        mx.copy_from(np.zeros(1, np.uint32))
        cas.copy_from(np.zeros(2, np.int32))
        dev.launch(m.get_kernel("hist"), (8,), (128,), [dd, np.int32(len(data)), bins, mx, cas])
        np.testing.assert_array_equal(bins.copy_to(np.empty(16, np.uint32)), np.bincount(data & 15, minlength=16))
        assert mx.copy_to(np.empty(1, np.uint32))[0] == data.max()
        flag, first = cas.copy_to(np.empty(2, np.int32))
        assert flag == 1 and 1 <= first <= 8


def test_recursion_module_globals_and_integer_intrinsics(dev):
    m = load(dev, r"""
        __device__ __noinline__ int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
        __device__ int calls;
        __constant__ int bias[4];
        extern "C" __global__ void ints(const unsigned int* x, unsigned int* out, long long* wide) {
            int t = threadIdx.x;
            unsigned int v = x[t];
            out[8 * t + 0] = fib(t % 12) + bias[t % 4];
            out[8 * t + 1] = __popc(v);
            out[8 * t + 2] = __clz(v);
            out[8 * t + 3] = __brev(v);
            out[8 * t + 4] = __byte_perm(v, 0x01234567u, 0x5140);
            out[8 * t + 5] = (v >> 5) & 0x3ff;
            out[8 * t + 6] = __umulhi(v, 0x9e3779b9u);
            out[8 * t + 7] = (unsigned int)max((int)v, -5) / (t + 1) % 1000;
            wide[t] = (long long)(int)v * -3 + (long long)v % 7;
            atomicAdd(&calls, 1);
        }""")
    ptr, size = m.get_global("bias")
    assert size == 16
    dev.request("memcpy_htod", dst=ptr, size=16, data=np.array([10, 20, 30, 40], np.int32).tobytes())
    n = 64
    x = np.random.default_rng(4).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x[0], x[1] = 0, 0xFFFFFFFF
    with dev.allocate(x.nbytes) as dx, dev.allocate(n * 32) as do, dev.allocate(n * 8) as dw:
        dx.copy_from(x)
        dev.launch(m.get_kernel("ints"), (1,), (n,), [dx, do, dw])
        got = do.copy_to(np.empty((n, 8), np.uint32))
        wide = dw.copy_to(np.empty(n, np.int64))

    def fib(k):
        return k if k < 2 else fib(k - 1) + fib(k - 2)
    v = x.astype(np.uint64)
    bits = np.array([bin(int(a)).count("1") for a in x])
    clz = np.array([32 - int(a).bit_length() for a in x])
    brev = np.array([int(f"{int(a):032b}"[::-1], 2) for a in x])
    both = (v | (0x01234567 << 32)).astype(np.uint64)
    perm = sum(((both >> np.uint64(8 * s)) & np.uint64(0xFF)) << np.uint64(8 * i)
               for i, s in enumerate((0, 4, 1, 5)))
    np.testing.assert_array_equal(got[:, 0], [fib(t % 12) + [10, 20, 30, 40][t % 4] for t in range(n)])
    np.testing.assert_array_equal(got[:, 1], bits)
    np.testing.assert_array_equal(got[:, 2], clz)
    np.testing.assert_array_equal(got[:, 3], brev)
    np.testing.assert_array_equal(got[:, 4], perm)
    np.testing.assert_array_equal(got[:, 5], (x >> 5) & 0x3FF)
    np.testing.assert_array_equal(got[:, 6], (v * 0x9E3779B9) >> np.uint64(32))
    signed = x.view(np.int32).astype(np.int64)
    np.testing.assert_array_equal(got[:, 7], (np.maximum(signed, -5).astype(np.uint32) // np.arange(1, n + 1)) % 1000)
    np.testing.assert_array_equal(wide, signed * -3 + (v % 7).astype(np.int64))
    calls, _ = m.get_global("calls")
    assert dev.request("memcpy_dtoh", src=calls, size=4)["data"] == n.to_bytes(4, "little")



def test_dot_product_and_sad_intrinsics(dev):
    """__dp4a, __dp2a_lo/hi and __sad/__usad: NVRTC emits dp4a, dp2a and sad for them."""
    m = load(dev, r"""
        extern "C" __global__ void k(const int* a, const int* b, int* o) {
            int i = threadIdx.x;
            o[5 * i + 0] = __dp4a(a[i], b[i], 3);
            o[5 * i + 1] = __dp2a_lo(a[i], b[i], 1);
            o[5 * i + 2] = __dp2a_hi((unsigned)a[i], (unsigned)b[i], 2u);
            o[5 * i + 3] = __sad(a[i], b[i], 5u);
            o[5 * i + 4] = __usad(a[i], b[i], 1u);
        }""")
    n = 64
    rng = np.random.default_rng(7)
    a = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    b = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    a[0], b[0] = -2**31, 2**31 - 1
    with dev.allocate(a.nbytes) as da, dev.allocate(b.nbytes) as db, dev.allocate(n * 20) as do:
        da.copy_from(a)
        db.copy_from(b)
        dev.launch(m.get_kernel("k"), (1,), (n,), [da, db, do])
        got = do.copy_to(np.empty((n, 5), np.uint32))
    ua, ub = a.view(np.uint32), b.view(np.uint32)
    for i in range(n):
        x, y = int(ua[i]), int(ub[i])
        want = [_dp(x, y, 3, True, True, 4), _dp(x, y, 1, True, True, 2, 0), _dp(x, y, 2, False, False, 2, 2),
                5 + abs(_s(x) - _s(y)), 1 + abs(x - y)]
        assert [int(v) for v in got[i]] == [w & 0xFFFFFFFF for w in want], (i, hex(x), hex(y))

def test_float_conversions_and_comparisons(dev):
    m = load(dev, r"""
        extern "C" __global__ void conv(const float* x, int* out, float* fout, unsigned short* h) {
            int t = threadIdx.x;
            float v = x[t];
            out[6 * t + 0] = __float2int_rn(v);
            out[6 * t + 1] = __float2int_rd(v);
            out[6 * t + 2] = __float2int_ru(v);
            out[6 * t + 3] = (int)v;                     // truncation, saturated like the device
            out[6 * t + 4] = (v != v) ? 7 : (v < 0.5f);  // NaN compares false
            out[6 * t + 5] = __float2uint_rz(v);
            fout[2 * t] = rintf(v) + floorf(v * 0.5f) - ceilf(v) + fminf(v, 1.0f) + copysignf(2.0f, v);
            fout[2 * t + 1] = (float)(double)v * 0.25f;
            unsigned short hv;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hv) : "f"(v));     // inline PTX arrives as is
            h[t] = hv;
        }""")
    x = np.array([0.0, -0.0, 0.5, 1.5, 2.5, -1.5, -2.5, 1e10, -1e10, 3.75, -3.75, np.nan,
                  np.inf, -np.inf, 1e-42, 65504.0], np.float32)
    n = len(x)
    with np.errstate(invalid="ignore", over="ignore"), dev.allocate(x.nbytes) as dx, dev.allocate(n * 24) as do, \
            dev.allocate(n * 8) as df, dev.allocate(n * 2) as dh:
        dx.copy_from(x)
        dev.launch(m.get_kernel("conv"), (1,), (n,), [dx, do, df, dh])
        got = do.copy_to(np.empty((n, 6), np.int32))
        f = df.copy_to(np.empty((n, 2), np.float32))
        h = dh.copy_to(np.empty(n, np.uint16))

        def sat(a, lo=-2**31, hi=2**31 - 1):
            a = np.where(np.isnan(a), 0, a).astype(np.float64)
            return np.clip(a, lo, hi).astype(np.int64)
        np.testing.assert_array_equal(got[:, 0], sat(np.rint(x)))
        np.testing.assert_array_equal(got[:, 1], sat(np.floor(x)))
        np.testing.assert_array_equal(got[:, 2], sat(np.ceil(x)))
        np.testing.assert_array_equal(got[:, 3], sat(np.trunc(x)))
        np.testing.assert_array_equal(got[:, 4], np.where(np.isnan(x), 7, x < 0.5))
        np.testing.assert_array_equal(got[:, 5].view(np.uint32), sat(np.trunc(x), 0, 2**32 - 1).astype(np.uint32))
        want = (np.rint(x) + np.floor(x * np.float32(0.5)) - np.ceil(x) + np.fmin(x, np.float32(1))
                + np.copysign(np.float32(2), x))
        np.testing.assert_array_equal(f[:, 0], want.astype(np.float32))
        np.testing.assert_array_equal(f[:, 1], x * np.float32(0.25))
        np.testing.assert_array_equal(h, x.astype(np.float16).view(np.uint16))


CARRY = rb"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry carry(.param .u64 out, .param .u64 a, .param .u64 b)
{
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [a];
    ld.param.u64 %rd3, [b];
    {   // as libdevice's inline assembly writes it: names without %, several in one .reg
    .reg .u32 alo, ahi, blo, bhi, s0, s1, s2;
    mov.b64 {alo, ahi}, %rd2;
    mov.b64 {blo, bhi}, %rd3;
    add.cc.u32 s0, alo, blo;
    addc.cc.u32 s1, ahi, bhi;
    addc.u32 s2, 0, 0;
    st.global.v2.u32 [%rd1], {s0, s1};
    st.global.u32 [%rd1+8], s2;
    sub.cc.u32 s0, alo, blo;
    subc.cc.u32 s1, ahi, bhi;
    subc.u32 s2, 0, 0;
    st.global.v2.u32 [%rd1+16], {s0, s1};
    st.global.u32 [%rd1+24], s2;
    mad.lo.cc.u32 s0, alo, blo, ahi;
    madc.hi.u32 s1, alo, blo, 0;
    st.global.v2.u32 [%rd1+32], {s0, s1};
    }
    add.cc.u64 %rd4, %rd2, %rd3;
    st.global.u64 [%rd1+40], %rd4;
    mad.lo.cc.u64 %rd4, %rd2, %rd3, %rd2;
    madc.hi.u64 %rd5, %rd2, %rd3, 0;
    st.global.v2.u64 [%rd1+48], {%rd4, %rd5};
    ret;
}
"""


@pytest.mark.parametrize("a, b", [(0, 0), (2**64 - 1, 1), (1, 2), (0xFFFFFFFF, 0xFFFFFFFF),
                                  (0x123456789ABCDEF0, 0xFEDCBA9876543210), (2**63, 2**63)])
def test_carry_chains_as_libdevice_writes_them(dev, a, b):
    """add.cc / addc / sub.cc / subc / mad.lo.cc / madc.hi (32 and 64 bits), carrying
    through the condition code: the multi-word arithmetic of libdevice's sin and cos."""
    m = dev.load_module(image=CARRY, kind="ptx")
    M = 2**64
    with dev.allocate(64) as out:
        out.fill(0)
        dev.launch(m.get_kernel("carry"), (1,), (1,), [out, np.uint64(a), np.uint64(b)])
        got = [int(v) for v in out.copy_to(np.empty(8, np.uint64))]
    assert got == [(a + b) % M, (a + b) // M, (a - b) % M, 0xFFFFFFFF if a < b else 0,
                   (a % 2**32) * (b % 2**32) + (a >> 32), (a + b) % M, (a * b + a) % M, (a * b + a) // M]


ROUNDED = rb"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry rounded(.param .u64 out, .param .u64 in)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<6>;
    .reg .f32 %f<12>;
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [in];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 8;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.v2.f32 {%f1, %f2}, [%rd4];
    add.rm.f32 %f3, %f1, %f2;
    add.rp.f32 %f4, %f1, %f2;
    sub.rz.f32 %f5, %f1, %f2;
    mul.rm.f32 %f6, %f1, %f2;
    mul.rp.f32 %f7, %f1, %f2;
    fma.rm.f32 %f8, %f1, %f2, %f1;
    div.rz.f32 %f9, %f1, %f2;
    abs.f32 %f10, %f1;
    sqrt.rp.f32 %f11, %f10;
    mul.wide.u32 %rd3, %r1, 36;
    add.s64 %rd5, %rd1, %rd3;
    st.global.v4.f32 [%rd5], {%f3, %f4, %f5, %f6};
    st.global.v4.f32 [%rd5+16], {%f7, %f8, %f9, %f11};
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd5+32], %f3;
    ret;
}
"""


def _round32(exact: Fraction, mode: str) -> np.float32:
    """`exact` rounded to float32 down (rm), up (rp) or toward zero (rz)."""
    lo = np.float32(float(exact))
    while Fraction(float(lo)) > exact:
        lo = np.nextafter(lo, np.float32(-np.inf))
    while Fraction(float(np.nextafter(lo, np.float32(np.inf)))) <= exact:
        lo = np.nextafter(lo, np.float32(np.inf))
    hi = lo if Fraction(float(lo)) == exact else np.nextafter(lo, np.float32(np.inf))
    return {"rm": lo, "rp": hi, "rz": lo if exact >= 0 else hi}[mode]


def _sqrt_up(x: np.float32) -> np.float32:
    r = np.float32(np.sqrt(np.float64(x)))
    while r > 0 and Fraction(float(np.nextafter(r, np.float32(0)))) ** 2 >= Fraction(float(x)):
        r = np.nextafter(r, np.float32(0))
    while Fraction(float(r)) ** 2 < Fraction(float(x)):
        r = np.nextafter(r, np.float32(np.inf))
    return r


def test_directed_rounding_modes(dev):
    """.rm .rp .rz on float add, sub, mul, fma, div and sqrt round each result that way
    (libdevice's expf builds its result from the bits of an fma.rm); the next instruction
    is round-to-nearest again."""
    rng = np.random.default_rng(7)
    xy = np.concatenate([rng.uniform(-4, 4, (60, 2)), [[1, 3], [-1, 3], [2, 1e-9], [1e30, -7]]]).astype(np.float32)
    m = dev.load_module(image=ROUNDED, kind="ptx")
    with dev.allocate(xy.nbytes) as din, dev.allocate(len(xy) * 36) as dout:
        din.copy_from(xy)
        dev.launch(m.get_kernel("rounded"), (1,), (len(xy),), [dout, din])
        got = dout.copy_to(np.empty((len(xy), 9), np.float32))
    for (x, y), g in zip(xy, got, strict=True):
        fx, fy = Fraction(float(x)), Fraction(float(y))
        want = [_round32(fx + fy, "rm"), _round32(fx + fy, "rp"), _round32(fx - fy, "rz"),
                _round32(fx * fy, "rm"), _round32(fx * fy, "rp"), _round32(fx * fy + fx, "rm"),
                _round32(fx / fy, "rz"), _sqrt_up(abs(x)), x + y]
        np.testing.assert_array_equal(g, np.array(want, np.float32), err_msg=f"x={x!r} y={y!r}")


HAND = r"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry hand(.param .u64 out, .param .u32 a, .param .u32 b)
{{
    .reg .b32 %r<12>;
    .reg .pred %p<4>;
    .reg .b64 %rd<3>;
    .reg .f32 %f<3>;
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [a];
    ld.param.u32 %r2, [b];
    {body}
    st.global.v4.u32 [%rd1], {{%r3, %r4, %r5, %r6}};
    st.global.v4.u32 [%rd1+16], {{%r7, %r8, %r9, %r10}};
    ret;
}}
"""


@pytest.mark.parametrize("body, want", [
    ("bfe.s32 %r3, %r1, 4, 8; bfe.u32 %r4, %r1, 28, 8; bfi.b32 %r5, %r2, %r1, 8, 4;"
     "lop3.b32 %r6, %r1, %r2, 0xF0F0F0F0, 0x96; prmt.b32 %r7, %r1, %r2, 0x7531; mul.hi.s32 %r8, %r1, %r2;"
     "mad.lo.u32 %r9, %r1, %r2, 5; sub.sat.s32 %r10, %r1, %r2;",
     lambda a, b: [_sx(((a >> 4) & 0xFF), 8), (a >> 28), (a & ~0xF00) | ((b & 0xF) << 8),
                   a ^ b ^ 0xF0F0F0F0, _prmt(a, b, 0x7531), ((_s(a) * _s(b)) >> 32) & 0xFFFFFFFF,
                   (a * b + 5) & 0xFFFFFFFF, max(-2**31, min(2**31 - 1, _s(a) - _s(b))) & 0xFFFFFFFF]),
    ("setp.lt.s32 %p1, %r1, %r2; setp.lo.u32 %p2|%p3, %r1, %r2; selp.b32 %r3, 1, 2, %p1; selp.b32 %r4, 1, 2, %p2;"
     "selp.b32 %r5, 1, 2, %p3; set.gt.and.u32.s32 %r6, %r1, %r2, !%p1; shl.b32 %r7, %r1, 33; shr.s32 %r8, %r1, 40;"
     "div.s32 %r9, %r1, 0; rem.u32 %r10, %r1, 0;",
     lambda a, b: [1 if _s(a) < _s(b) else 2, 1 if a < b else 2, 2 if a < b else 1,
                   0xFFFFFFFF if (_s(a) > _s(b) and not _s(a) < _s(b)) else 0, 0,
                   0xFFFFFFFF if _s(a) < 0 else 0, 0xFFFFFFFF, a]),
    ("mov.b32 %f1, %r1; mov.b32 %f2, %r2; setp.nan.f32 %p1, %f1, %f2; setp.neu.f32 %p2, %f1, %f2;"
     "selp.u32 %r3, 1, 0, %p1; selp.u32 %r4, 1, 0, %p2; testp.subnormal.f32 %p3, %f1; selp.u32 %r5, 1, 0, %p3;"
     "add.ftz.f32 %f1, %f1, 0f00000000; mov.b32 %r6, %f1; popc.b32 %r7, %r1; clz.b32 %r8, %r2;"
     "brev.b32 %r9, %r2; cnot.b32 %r10, %r2;",
     lambda a, b: [int(_isnan(a) or _isnan(b)), int(_isnan(a) or _isnan(b) or _f(a) != _f(b)),
                   int(0 < (a & 0x7FFFFFFF) < 0x800000), _ftz_add(a), bin(a).count("1"),
                   32 - b.bit_length(), int(f"{b:032b}"[::-1], 2), int(b == 0)]),
    ("dp4a.s32.s32 %r3, %r1, %r2, 7; dp4a.u32.s32 %r4, %r1, %r2, 0; dp2a.lo.s32.u32 %r5, %r1, %r2, 1;"
     "dp2a.hi.u32.u32 %r6, %r1, %r2, 0; mul24.hi.s32 %r7, %r1, %r2; mad24.lo.u32 %r8, %r1, %r2, 3;"
     "sad.s32 %r9, %r1, %r2, 2; mul24.hi.u32 %r10, %r1, %r2;",
     lambda a, b: [_dp(a, b, 7, True, True, 4), _dp(a, b, 0, False, True, 4), _dp(a, b, 1, True, False, 2, 0),
                   _dp(a, b, 0, False, False, 2, 2), _mul24(a, b, True, True), _mul24(a, b, False, False) + 3,
                   2 + abs(_s(a) - _s(b)), _mul24(a, b, False, True)]),
    ("and.b32 %r11, %r1, 0x3f; szext.clamp.s32 %r3, %r2, %r11; szext.wrap.s32 %r4, %r2, %r11;"
     "szext.clamp.u32 %r5, %r2, %r11; and.b32 %r11, %r2, 0x3f; bmsk.wrap.b32 %r6, %r11, 9;"
     "bmsk.clamp.b32 %r7, 3, %r11; bmsk.wrap.b32 %r8, %r11, %r11; mul24.lo.s32 %r9, %r1, %r2;"
     "sad.u32 %r10, %r1, %r2, 0xFFFFFFF0;",
     lambda a, b: [_szext(b, a & 63, True, True), _szext(b, a & 63, False, True), _szext(b, a & 63, True, False),
                   _bmsk(b & 63, 9, False), _bmsk(3, b & 63, True), _bmsk(b & 63, b & 63, False),
                   _mul24(a, b, True, False), 0xFFFFFFF0 + abs(a - b)]),
])
@pytest.mark.parametrize("a, b", [(0x12345678, 0x9ABCDEF0), (0x80000001, 7), (0x00000001, 0x7FC00000),
                                  (0x00000000, 0x00000000), (0xFFFFFFFF, 0x00400000)])
def test_single_instructions_against_a_reference(dev, body, want, a, b):
    m = dev.load_module(image=HAND.format(body=body).encode(), kind="ptx")
    with dev.allocate(32) as out:
        dev.launch(m.get_kernel("hand"), (1,), (1,), [out, np.uint32(a), np.uint32(b)])
        got = [int(v) for v in out.copy_to(np.empty(8, np.uint32))]
    assert got == [w & 0xFFFFFFFF for w in want(a, b)]


def _s(x: int) -> int:
    return x - (1 << 32) if x & 0x80000000 else x


def _sx(x: int, bits: int) -> int:
    return (x - (1 << bits) if x & (1 << (bits - 1)) else x) & 0xFFFFFFFF


def _dp(a: int, b: int, c: int, sa: bool, sb: bool, n: int, hi: int = 0) -> int:
    """dp4a (n=4: bytes of a) and dp2a (n=2: 16-bit halves of a, bytes hi.. of b)."""
    wa = 8 if n == 4 else 16
    total = c
    for i in range(n):
        x = (a >> (wa * i)) & ((1 << wa) - 1)
        y = (b >> (8 * (i + hi))) & 0xFF
        total += (x - (1 << wa) if sa and x >> (wa - 1) else x) * (y - 256 if sb and y >> 7 else y)
    return total


def _mul24(a: int, b: int, signed: bool, hi: bool) -> int:
    def ext(v: int) -> int:
        v &= 0xFFFFFF
        return v - (1 << 24) if signed and v >> 23 else v
    p = (ext(a) * ext(b)) & ((1 << 64) - 1)
    return p >> 16 if hi else p


def _bmsk(a: int, b: int, clamp: bool) -> int:
    """The PTX ISA's bmsk semantics, step by step."""
    a1, b1 = a & 31, b & 31
    mask0, total = (0xFFFFFFFF << a1) & 0xFFFFFFFF, a1 + b1
    mask1 = (0xFFFFFFFF << total) & 0xFFFFFFFF if total < 32 else 0
    overflow = total >= 32
    if clamp and a >= 32:
        mask0, overflow = 0, True
    if clamp and b >= 32:
        overflow = True
    mask1 = 0 if overflow else 0xFFFFFFFF if b1 == 0 else mask1
    return mask0 & ~mask1


def _szext(a: int, b: int, clamp: bool, signed: bool) -> int:
    """The PTX ISA's szext semantics, step by step."""
    b1 = b & 31
    too_large = b >= 32 and clamp
    mask = 0 if too_large else (0xFFFFFFFF << b1) & 0xFFFFFFFF
    sign = not (b1 == 0 or too_large or not signed) and (a >> ((b1 - 1) & 31)) & 1
    return (a & ~mask) | (mask if sign else 0)


def _prmt(a: int, b: int, c: int) -> int:
    x = (b << 32) | a
    return sum(((x >> (8 * ((c >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _f(x: int) -> float:
    return float(np.array([x], np.uint32).view(np.float32)[0])


def _isnan(x: int) -> bool:
    return (x & 0x7FFFFFFF) > 0x7F800000


def _ftz_add(x: int) -> int:
    """add.ftz.f32 x, +0: a subnormal input counts as a zero of its sign, and -0 + +0 is +0."""
    if 0 < (x & 0x7FFFFFFF) < 0x800000:
        x &= 0x80000000
    with np.errstate(all="ignore"):
        return int((np.array([x], np.uint32).view(np.float32) + np.float32(0)).view(np.uint32)[0])


@pytest.mark.parametrize("src, construct", [
    (r"""extern "C" __global__ void k(int* o) { asm("bar.red.u32 %0, 0, 1;" : "=r"(o[0])); }""",
     "expected .popc, .and or .or"),
    (r"""extern "C" __global__ void k(unsigned* o) { asm("mov.u32 %0, %%envreg7;" : "=r"(o[0])); }""",
     "special register %envreg7"),
    (r"""extern "C" __global__ void k(cudaTextureObject_t t, float* o) { o[0] = tex1Dfetch<float>(t, 0); }""",
     "textures and surfaces"),
])
def test_what_is_not_run_yet_is_refused_by_name_and_line(session, src, construct):
    """Never a wrong result: the module load fails with CUDA_ERROR_NOT_SUPPORTED naming the
    PTX instruction (or call) and its line."""
    dev = session.device("cpu0")
    with pytest.raises(kc.CudaError) as e:
        load(dev, src)
    assert e.value.code == E.CUDA_ERROR_NOT_SUPPORTED, e.value
    assert "PTX line" in str(e.value) and construct in str(e.value), str(e.value)


def _K(decls: str, body: str) -> bytes:
    return (".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() {\n"
            f"{decls}\n{body}\nret;\n}}\n").encode()


@pytest.mark.parametrize("text, message", [
    (b"not ptx at all", "PTX line 1: unknown module-level directive 'not'"),
    (b".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() { ld.global.u32 %r1, [0]; }",
     "PTX line 4: %r1 is not a declared register"),
    (b".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() {\n  add.s32 ;\n}", "add takes 3"),
    (b".version 8.0\n.address_size 64\n.visible .entry k() { bra $nowhere;", "unclosed|unexpected end"),
    (b"\xff\xfe garbage", "not UTF-8"),
    # found by an attacker review: each reached Python's own errors, or the host compiler
    (_K(".reg .b32 %r<2>;", "mov.u32 %r1, 09;"), "not an integer: '09'"),
    (_K(".reg .b32 %r<2>;", "bra NOWHERE;"), "bra to NOWHERE, a label this function does not define"),
    (_K(".reg .b32 %r<2>;", "L1: ret; L1: ret;"), "label L1 defined twice"),
    (_K(".reg .b32 %r<2>; .reg .f32 %r<2>;", ""), "%r0 declared twice in one scope"),
    (_K(".shared .b8 s[-100];", ""), "a negative array size"),
    (_K(".local .align 3 .b8 l[4];", ""), "a power of two from 1 to 4096"),
    (b".version 8.0\n.target sm_80\n.address_size 64\n.global .u32 g = 0d3FF0000000000000;",
     "a 64-bit float initializer for .u32 g"),
    # a second review: a handler reaching past the operands given, and registers of the
    # wrong width (ptxas refuses them; they must not get a meaning of the translator's own)
    (_K(".reg .b32 %r<3>; .reg .pred %p<2>;", "set.eq.u32.s32 %r1, %r2;"), "set.eq.u32.s32: too few operands"),
    (_K(".reg .b32 %r<3>; .reg .b64 %rd<2>;", "add.s32 %r1, %rd1, %r2;"), "%rd1 is a .b64 register, used as .s32"),
    (_K(".reg .b32 %r<3>; .reg .pred %p<2>;", "mov.b32 %r1, %p1;"), "%p1 is a .pred register, used as .b32"),
    (_K(".reg .b32 %r<3>;", "mul.wide.u32 %r1, %r2, %r2;"), "%r1 is a .b32 register, used as .u64"),
    (_K(".reg .b32 %r<3>; .reg .b64 %rd<2>;", "st.global.b64 [%rd1], %r1;"), "%r1 is a .b32 register, used as .b64"),
    (_K(".reg .b32 %r<3>; .reg .b64 %rd<2>;", "cvta.shared.u32 %r1, %rd1;"), "%rd1 is a .b64 register, used as .u32"),
    (_K(".reg .b32 %r<3>; .reg .pred %p<2>;", "setp.eq.u32 %r1, %r2, %r2;"), "%r1 is a .b32 register, used as .pred"),
    (_K(".reg .b32 %r<3>;", "mov.u32 %r1, " + "x" * 5000 + ";"), r"\.\.\. \(\d+ characters\)"),
])
def test_malformed_ptx_is_invalid_ptx_naming_the_line(session, text, message):
    dev = session.device("cpu0")
    with pytest.raises(kc.CudaError, match=message) as e:
        dev.load_module(image=text, kind="ptx")
    assert e.value.code == E.CUDA_ERROR_INVALID_PTX, e.value


def test_ptx_names_cannot_reach_the_generated_code(session):
    """PTX names become C++ identifiers re-spelled letter by letter: a name made of PTX's
    extra characters ($, %) and one that is a C++ keyword still name just themselves."""
    dev = session.device("cpu0")
    text = b"""
.version 8.0
.target sm_80
.address_size 64
.global .align 4 .u32 delete[1] = {41};
.visible .entry $weird$name_1(.param .u64 int)
{
    .reg .b32 %return;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [int];
    ld.global.u32 %return, [delete];
    add.u32 %return, %return, 1;
    st.global.u32 [%rd1], %return;
    ret;
}
"""
    m = dev.load_module(image=text, kind="ptx")
    with dev.allocate(4) as out:
        dev.launch(m.get_kernel("$weird$name_1"), (1,), (1,), [out])
        assert out.copy_to(np.empty(1, np.uint32))[0] == 42
    assert m.get_global("delete")[1] == 4


@needs_nvcc
def test_nvcc_ptx_runs_too(session, tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(r"""
        extern "C" __global__ void sq(float* x, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) x[i] = x[i] * x[i];
        }""")
    subprocess.run([NVCC, "-ptx", "-arch=compute_80", "-o", str(tmp_path / "k.ptx"), str(src)], check=True,
                   capture_output=True)
    dev = session.device("cpu0")
    m = dev.load_module(image=(tmp_path / "k.ptx").read_bytes(), kind="ptx")
    x = np.arange(300, dtype=np.float32)
    with dev.allocate(x.nbytes) as dx:
        dx.copy_from(x)
        dev.launch(m.get_kernel("sq"), (3,), (128,), [dx, np.int32(len(x))])
        np.testing.assert_array_equal(dx.copy_to(np.empty_like(x)), x * x)


@pytest.mark.parametrize("decl, message", [
    (".reg .b32 %r<100000000>;", "more than 262144 registers"),
    (".shared .align 4 .b8 big[1048576];", "static .shared memory"),
    (".local .align 4 .b8 big[100000000000];", "of 100000000000 bytes"),
    # under the bound per function, but a module of many such functions is not
    ("} .func f1() { .reg .b32 %r<262000>; ret; } .func f2() { .reg .b32 %r<262000>; ret; }"
     " .func f3() { .reg .b32 %r<262000>; ret; } .func f4() { .reg .b32 %r<262000>; ret; }"
     " .func f5() { .reg .b32 %r<262000>; ret;", "more than 1048576 registers in one module"),
])
def test_hostile_ptx_is_bounded_before_it_costs_anything(session, broker, decl, message):
    """Declarations that would make the translator (or the compiler) take unbounded memory
    are refused as they are read: a clear NOT_SUPPORTED, and the broker serves on."""
    text = f"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry k() {{ {decl} ret; }}
""".encode()
    with pytest.raises(kc.CudaError, match=message) as e:
        session.device("cpu0").load_module(image=text, kind="ptx")
    assert e.value.code == E.CUDA_ERROR_NOT_SUPPORTED
    assert broker.alive()


WARPS = r"""
extern "C" __global__ void warp_sum(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? in[i] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x + 31) / 32 ? partial[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) atomicAdd(out, v);
    }
}
extern "C" __global__ void lanes(const int* in, int* out) {
    int t = threadIdx.x, lane = t & 31;
    int v = in[t];
    out[8 * t + 0] = __shfl_sync(0xffffffffu, v, 3);              // broadcast lane 3
    out[8 * t + 1] = __shfl_up_sync(0xffffffffu, v, 1, 8);        // within groups of 8
    out[8 * t + 2] = __ballot_sync(0xffffffffu, v & 1);
    out[8 * t + 3] = __any_sync(0xffffffffu, v > 90) + 2 * __all_sync(0xffffffffu, v >= 0);
    out[8 * t + 4] = __reduce_add_sync(0xffffffffu, (unsigned)v);
    out[8 * t + 5] = __reduce_max_sync(0xffffffffu, v - 50);
    out[8 * t + 6] = __match_any_sync(0xffffffffu, v % 4);
    unsigned below = __ballot_sync(0xffffffffu, v & 1) & ((1u << lane) - 1u);
    out[8 * t + 7] = (v & 1) ? __popc(below) : -1;                 // compaction slot
}
"""


def test_warp_shuffles_votes_and_reductions(dev):
    m = load(dev, WARPS)
    n = 4000
    x = (np.arange(n, dtype=np.float32) % 13) - 6
    with dev.allocate(x.nbytes) as dx, dev.allocate(4) as out:
        dx.copy_from(x)
        out.copy_from(np.zeros(1, np.float32))
        dev.launch(m.get_kernel("warp_sum"), ((n + 255) // 256,), (256,), [dx, out, np.int32(n)])
        assert out.copy_to(np.empty(1, np.float32))[0] == x.sum()
    t = 64
    v = np.random.default_rng(5).integers(0, 100, t).astype(np.int32)
    with dev.allocate(v.nbytes) as dv, dev.allocate(t * 32) as do:
        dv.copy_from(v)
        dev.launch(m.get_kernel("lanes"), (1,), (t,), [dv, do])
        got = do.copy_to(np.empty((t, 8), np.int32))
    for w in range(t // 32):
        wv = v[32 * w:32 * w + 32]
        g = got[32 * w:32 * w + 32]
        ballot = sum(1 << k for k in range(32) if wv[k] & 1)
        np.testing.assert_array_equal(g[:, 0], np.full(32, wv[3]))
        np.testing.assert_array_equal(g[:, 1], [wv[k - 1] if k % 8 else wv[k] for k in range(32)])
        np.testing.assert_array_equal(g[:, 2].view(np.uint32), np.full(32, ballot, np.uint32))
        np.testing.assert_array_equal(g[:, 3], np.full(32, int((wv > 90).any()) + 2 * int((wv >= 0).all())))
        np.testing.assert_array_equal(g[:, 4], np.full(32, wv.sum()))
        np.testing.assert_array_equal(g[:, 5], np.full(32, (wv - 50).max()))
        np.testing.assert_array_equal(g[:, 6].view(np.uint32),
                                      [sum(1 << k for k in range(32) if wv[k] % 4 == wv[j] % 4) for j in range(32)])
        np.testing.assert_array_equal(g[:, 7], [bin(ballot & ((1 << k) - 1)).count("1") if wv[k] & 1 else -1
                                                for k in range(32)])


def test_device_printf_from_ptx_reaches_the_program(broker):
    """vprintf as NVRTC calls it: the format and a buffer of arguments, each at its own
    alignment; the line reaches the stdout of the program that launched the kernel."""
    ptx = nvrtc_ptx(r"""
        extern "C" __global__ void hi(int n, long long big, double x, const char* unused) {
            if (threadIdx.x < 2)
                printf("hello %d from %u: %lld %.3f %5s|%-4x|%c%% %n\n", n, threadIdx.x, big, x, "ab", 255, 'z');
        }""")
    code = f"""
        import kubecash.client as kc
        with kc.connect() as s:
            d = s.device("cpu0")
            k = d.load_module(image={ptx!r}, kind="ptx").get_kernel("hi")
            d.launch(k, (1,), (32,), [7, -(1 << 40), 2.5, 0])
            d.synchronize()
            print("after sync", flush=True)
    """
    p = run_client(code, broker.address("alice"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = out.splitlines()
    want = [f"hello 7 from {t}: -1099511627776 2.500    ab|ff  |z% %n" for t in (0, 1)]
    assert sorted(lines[:2]) == want, out
    assert lines[2] == "after sync"


def test_a_volatile_spin_sees_another_blocks_store(dev):
    """ld.volatile is a real load each time: block 1 spins until block 0 (run by another
    worker, or before it on the same one) sets the flag; a load kept in a register would spin
    forever. (Blocks are independent on a GPU too; this is the classic done-flag pattern.)"""
    m = load(dev, r"""
        extern "C" __global__ void flag(volatile int* f, int* out) {
            if (blockIdx.x == 0) { out[0] = 42; __threadfence(); f[0] = 1; }
            else { long long spins = 0; while (f[0] == 0 && spins < 2000000000LL) ++spins; out[1] = f[0]; }
        }""")
    with dev.allocate(4) as f, dev.allocate(8) as out:
        f.copy_from(np.zeros(1, np.int32))
        dev.launch(m.get_kernel("flag"), (2,), (1,), [f, out])
        assert list(out.copy_to(np.empty(2, np.int32))) == [42, 1]


def test_debug_ptx_with_dwarf_sections_runs(dev):
    """NVRTC -G (cuda-gdb builds) writes .section .debug_* blocks of .b8 data: skipped."""
    text = nvrtc_ptx(r"""extern "C" __global__ void inc(int* p) { p[threadIdx.x] += threadIdx.x; }""", "-G")
    assert b".section\t.debug_abbrev" in text or b".section .debug_abbrev" in text
    m = dev.load_module(image=text, kind="ptx")
    with dev.allocate(4 * 32) as d:
        d.copy_from(np.ones(32, np.int32))
        dev.launch(m.get_kernel("inc"), (1,), (32,), [d])
        np.testing.assert_array_equal(d.copy_to(np.empty(32, np.int32)), 1 + np.arange(32))


def test_translation_is_bounded_by_the_builds_time(tmp_path):
    """Parsing and translating are linear but not free (about 1 s per 12k instructions): a
    huge module ends at the build's time bound like a slow host compile does."""
    from kubecash.broker import cpukernels as ck
    body = "\n".join("add.s32 %r1, %r1, 1;" for _ in range(200_000))
    text = (".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() {\n.reg .b32 %r<2>;\n"
            f"{body}\nret;\n}}\n")
    t0 = time.monotonic()
    with pytest.raises(ck.KernelCompileError, match="timed out") as e:
        ck.compile_module(text, cache_dir=tmp_path, language="ptx", timeout_s=1)
    assert e.value.code == E.CUDA_ERROR_INVALID_SOURCE and "time bound" in e.value.log
    assert time.monotonic() - t0 < 20
