"""PTX that numba-cuda makes without a GPU (`numba.cuda.compile_ptx` of @cuda.jit-style
functions, NVVM from pip's nvidia-nvvm or the toolkit) runs through the client library,
each kernel checked against numpy.

numba's kernel ABI (numba/cuda/dispatcher.py, _prepare_args): every argument is flattened
into separate .entry parameters. A scalar is one parameter of its type; an array of ndim
dimensions is 5 + 2 * ndim of them, the fields of numba's array struct in order:
meminfo (u64, 0 from a launch), parent (u64, 0), nitems (i64: elements), itemsize (i64:
bytes per element), data (u64: the device address), shape[ndim] (i64 each) and strides[ndim]
(i64 each, in bytes). numba_args() below builds that list; Array pairs a device buffer
with the shape, dtype and strides numba is told about."""
from __future__ import annotations

import math
import os
import re
import types

import numpy as np
import pytest

import kubecash.client as kc
from kubecash.client.errors import E

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda (pip numba-cuda[cu13]) compiles these kernels")
from numba import float32, int32  # noqa: E402  (after the skip: numba is numba-cuda's dependency)


def compile_ptx(pyfunc, sig: str) -> tuple[bytes, str]:
    """(PTX, its kernel's mangled .entry name) for `pyfunc` compiled as a kernel for sm_80:
    no GPU needed, only NVVM; where NVVM is not found the test is skipped."""
    from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
    try:
        ptx, _ = cuda.compile_ptx(pyfunc, sig, device=False, cc=(8, 0))
    except (NvvmSupportError, CudaSupportError) as e:
        pytest.skip(f"numba-cuda finds no NVVM here: {e}")
    (entry,) = re.findall(r"^\.visible \.entry (\S+)\(", ptx, re.M)
    return ptx.encode(), entry


class Array:
    """A device buffer as numba sees an array argument: shape, dtype and byte strides."""

    def __init__(self, buf: kc.Buffer, shape: tuple[int, ...], dtype, strides: tuple[int, ...] | None = None):
        self.buf, self.shape, self.dtype = buf, tuple(shape), np.dtype(dtype)
        c = [self.dtype.itemsize]
        for n in reversed(self.shape[1:]):
            c.insert(0, c[0] * n)
        self.strides = tuple(strides) if strides is not None else tuple(c)


def numba_args(*args) -> list:
    """Launch arguments laid out as numba's kernel ABI: each Array as meminfo, parent,
    nitems, itemsize, data, shape..., strides...; scalars (numpy scalars) as they are."""
    out: list = []
    for a in args:
        if isinstance(a, Array):
            out += [np.uint64(0), np.uint64(0), np.int64(math.prod(a.shape)), np.int64(a.dtype.itemsize),
                    a.buf, *map(np.int64, a.shape), *map(np.int64, a.strides)]
        else:
            out.append(a)
    return out


@pytest.fixture(scope="module", autouse=True)
def nvvm_loaded():
    """numba's first compile loads NVVM and libdevice with the GIL held (1.5 s and more on a
    cold CI machine): done here, before any test's session opens, so the client's heartbeat
    thread is not held past the tests' short heartbeat timeout."""
    compile_ptx(axpy, "void(float32[::1], float32, float32[::1], float32[::1])")


@pytest.fixture
def dev(session, dev_name):
    return session.device(dev_name)


@pytest.fixture
def run(dev):
    """run(pyfunc, sig, grid, block, *args): compile, load as a PTX image, launch; numpy
    arrays among args are copied to the device (and their results back, into them)."""
    def go(pyfunc, sig, grid, block, *args):
        ptx, entry = compile_ptx(pyfunc, sig)
        m = dev.load_module(image=ptx, kind="ptx")
        k = m.get_kernel(entry)
        bufs, launch = [], []
        try:
            for a in args:
                if isinstance(a, np.ndarray):
                    b = dev.allocate(max(a.nbytes, 1))
                    bufs.append((b, a))
                    b.copy_from(np.ascontiguousarray(a))
                    a = Array(b, a.shape, a.dtype)
                launch.append(a)
            assert len(k.param_sizes) == len(numba_args(*launch))
            dev.launch(k, grid, block, numba_args(*launch))
            for b, a in bufs:
                b.copy_to(a)
        finally:
            for b, _ in bufs:
                b.close()
    return go


# -- the kernels, as a numba-cuda program writes them ---------------------------------------

def axpy(out, a, x, y):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]


def add2d(out, x, y):
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = x[i, j] * 2.0 + y[i, j]


def block_sum(x, out):
    s = cuda.shared.array(128, dtype=float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    s[t] = x[i] if i < x.size else 0.0
    cuda.syncthreads()
    k = cuda.blockDim.x // 2
    while k > 0:
        if t < k:
            s[t] += s[t + k]
        cuda.syncthreads()
        k //= 2
    if t == 0:
        cuda.atomic.add(out, 0, s[0])


def hist(data, bins):
    i = cuda.grid(1)
    if i < data.size:
        cuda.atomic.add(bins, data[i] % bins.size, 1)


def maths(out, x):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i, 0] = math.exp(v)
        out[i, 1] = math.sin(v)
        out[i, 2] = math.sqrt(v)
        out[i, 3] = math.log(1.0 + v)
        out[i, 4] = math.cos(v) * math.tanh(v)
        out[i, 5] = math.atan2(v, 2.0) + math.pow(v, 1.5)


def intops(out, a, b):
    i = cuda.grid(1)
    if i < a.size:
        x, y = a[i], b[i]
        out[i, 0] = (x * y) ^ (x >> 3) | (y << 2) & 0xFFFF
        out[i, 1] = x // y
        out[i, 2] = x % y
        out[i, 3] = min(x, y) - max(x, y) + abs(x)


def local_array(out, x):
    i = cuda.grid(1)
    if i < out.size:
        a = cuda.local.array(8, dtype=int32)
        for k in range(8):
            a[k] = x[i] * k
        acc = 0
        for k in range(8):
            acc += a[(k * 3 + i) % 8]
        out[i] = acc


def test_elementwise_float32_and_float64(run):
    n = 1000
    rng = np.random.default_rng(1)
    for dt, rtol in ((np.float32, 1e-6), (np.float64, 1e-15)):
        x, y = rng.random(n).astype(dt), rng.random(n).astype(dt)
        out = np.zeros(n, dt)
        t = "float32" if dt == np.float32 else "float64"
        run(axpy, f"void({t}[::1], {t}, {t}[::1], {t}[::1])", ((n + 127) // 128,), (128,),
            out, dt(2.5), x, y)
        np.testing.assert_allclose(out, dt(2.5) * x + y, rtol=rtol)


def test_a_2d_grid_and_strided_arrays(run, dev):
    h, w = 37, 19
    rng = np.random.default_rng(2)
    x, y = rng.random((h, w)), rng.random((h, w))
    out = np.zeros((h, w))
    run(add2d, "void(float64[:, ::1], float64[:, ::1], float64[:, ::1])", (3, 3), (16, 8), out, x, y)
    np.testing.assert_array_equal(out, x * 2.0 + y)
    # Any layout ("A"): x's transpose is its buffer with the strides swapped, as numba passes it.
    ptx, entry = compile_ptx(add2d, "void(float64[:, :], float64[:, :], float64[:, :])")
    k = dev.load_module(image=ptx, kind="ptx").get_kernel(entry)
    with dev.allocate(x.nbytes) as dx, dev.allocate(x.nbytes) as dy, dev.allocate(x.nbytes) as do:
        dx.copy_from(x)
        dy.copy_from(np.ascontiguousarray(y.T))
        xt = Array(dx, (w, h), np.float64, strides=(8, 8 * w))
        dev.launch(k, (2, 5), (16, 8), numba_args(Array(do, (w, h), np.float64), xt, Array(dy, (w, h), np.float64)))
        np.testing.assert_array_equal(do.copy_to(np.empty((w, h))), x.T * 2.0 + y.T)


def test_shared_array_syncthreads_block_reduction_and_atomics(run):
    n = 5000
    x = (np.arange(n) % 7).astype(np.float32)
    total = np.zeros(1, np.float32)
    run(block_sum, "void(float32[::1], float32[::1])", ((n + 127) // 128,), (128,), x, total)
    assert total[0] == x.sum()
    data = np.random.default_rng(3).integers(0, 1000, 4096).astype(np.int32)
    bins = np.zeros(16, np.uint32)
    run(hist, "void(int32[::1], uint32[::1])", (32,), (128,), data, bins)
    np.testing.assert_array_equal(bins, np.bincount(data % 16, minlength=16))


@pytest.mark.parametrize("dt, rtol", [(np.float32, 2e-6), (np.float64, 1e-14)])
def test_math_functions_from_libdevice(run, dt, rtol):
    """math.exp, sin, sqrt... are libdevice's: range reductions with carry chains in inline
    assembly (mad.lo.cc, madc), exp's fma.rm, and bit tricks on the results."""
    x = np.concatenate([np.linspace(0, 10, 500), np.geomspace(1e-3, 1e5, 500)]).astype(dt)
    out = np.zeros((x.size, 6), dt)
    t = "float32" if dt == np.float32 else "float64"
    run(maths, f"void({t}[:, ::1], {t}[::1])", ((x.size + 127) // 128,), (128,), out, x)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):     # exp(1e5) is inf, in float64 too
        want = np.stack([np.exp(xd), np.sin(xd), np.sqrt(xd), np.log1p(xd), np.cos(xd) * np.tanh(xd),
                         np.arctan2(xd, 2.0) + xd ** 1.5], axis=1).astype(dt)
    # sin and cos near their zeros: absolute error against the result's scale
    np.testing.assert_allclose(out, want, rtol=rtol, atol=4 * np.finfo(dt).eps)


def test_integer_operations_with_python_semantics(run):
    rng = np.random.default_rng(4)
    a = rng.integers(-10**6, 10**6, 777)
    b = rng.integers(1, 1000, 777) * rng.choice([-1, 1], 777)
    out = np.zeros((777, 4), np.int64)
    run(intops, "void(int64[:, ::1], int64[::1], int64[::1])", (7,), (128,), out, a, b)
    np.testing.assert_array_equal(out[:, 0], (a * b) ^ (a >> 3) | (b << 2) & 0xFFFF)
    np.testing.assert_array_equal(out[:, 1], a // b)      # floor division, as in Python
    np.testing.assert_array_equal(out[:, 2], a % b)
    np.testing.assert_array_equal(out[:, 3], np.minimum(a, b) - np.maximum(a, b) + np.abs(a))


def test_local_array(run):
    x = np.arange(300, dtype=np.int32) - 150
    out = np.zeros(300, np.int32)
    run(local_array, "void(int32[::1], int32[::1])", (3,), (128,), out, x)
    i = np.arange(300)
    np.testing.assert_array_equal(out, sum(x * ((k * 3 + i) % 8) for k in range(8)))


@cuda.jit(device=True, inline="always")
def clamp(v, lo, hi):
    return max(lo, min(v, hi))


def clamped(out, x):
    i = cuda.grid(1)
    if i < x.size:
        out[i] = clamp(x[i], -1.0, 1.0)


def test_device_functions(run, monkeypatch):
    x = np.linspace(-3, 3, 200).astype(np.float32)
    out = np.zeros_like(x)
    run(clamped, "void(float32[::1], float32[::1])", (2,), (128,), out, x)
    np.testing.assert_array_equal(out, np.clip(x, -1, 1))
    # A device function left a function (recursion: a PTX .func called with numba's calling
    # convention, the result through a pointer, a status returned). numba-cuda asks the
    # current device for the compute capability of a called device function even in
    # compile_ptx: without a GPU there is none, so it is told sm_80's.
    import numba.cuda.dispatcher
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(8, 0)))

    @cuda.jit("int64(int64, int64)", device=True)
    def gcd(a, b):
        if b == 0:
            return a
        return gcd(b, a % b)

    def gcds(out, x, y):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = gcd(x[i], y[i])
    rng = np.random.default_rng(5)
    a, b = rng.integers(1, 10**9, 500), rng.integers(1, 10**6, 500)
    g = np.zeros(500, np.int64)
    assert b"call" in compile_ptx(gcds, "void(int64[::1], int64[::1], int64[::1])")[0]
    run(gcds, "void(int64[::1], int64[::1], int64[::1])", (4,), (128,), g, a, b)
    np.testing.assert_array_equal(g, np.gcd(a, b))


def test_what_the_translator_does_not_run_is_refused_by_name(session):
    """numba's own PTX for what the CPU backend does not run yet is a loud refusal: its
    fp16 intrinsics are calls into a CUDA C library numba links in afterwards (compile_ptx
    leaves them external), and PTX modules are not linked here."""
    def f16(out, x):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = cuda.fp16.hfma(x[i], x[i], x[i])
    try:
        ptx, _ = compile_ptx(f16, "void(float16[::1], float16[::1])")
    except Exception as e:          # numba-cuda without fp16 support: nothing to check
        pytest.skip(f"numba-cuda does not compile fp16 here: {e}")
    with pytest.raises(kc.CudaError) as e:
        session.device("cpu0").load_module(image=ptx, kind="ptx")
    assert e.value.code == E.CUDA_ERROR_NOT_SUPPORTED, e.value
    assert "PTX line" in str(e.value) and "external function" in str(e.value), str(e.value)


# -- numba-cuda itself, on KubeCASH's libcuda.so.1 --------------------------------------------
# The kernels above, compiled and launched by numba's own dispatcher this time.
NATIVE_PROGRAM = f"""
import json, sys, numpy as np
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from numba import cuda
import test_numba_ptx as t
axpy, add2d, block_sum, maths = (cuda.jit(f) for f in (t.axpy, t.add2d, t.block_sum, t.maths))
rng = np.random.default_rng(5)
x, y = rng.random(10_000).astype(np.float32), rng.random(10_000).astype(np.float32)
out = cuda.device_array_like(x)
axpy[(x.size + 127) // 128, 128](out, np.float32(2.5), cuda.to_device(x), cuda.to_device(y))
r = {{"axpy": bool(np.allclose(out.copy_to_host(), 2.5 * x + y, rtol=1e-6))}}
acc = cuda.to_device(np.zeros(1, np.float32))
block_sum[(x.size + 127) // 128, 128](cuda.to_device(x), acc)
r["sum"] = [float(acc.copy_to_host()[0]), float(x.sum(dtype=np.float64))]
a, b = rng.random((70, 90)), rng.random((70, 90))
o = cuda.device_array_like(a)
add2d[(5, 6), (16, 16)](o, cuda.to_device(a), cuda.to_device(b))
r["add2d"] = bool(np.array_equal(o.copy_to_host(), a * 2.0 + b))
m = cuda.device_array((x.size, 6), np.float64)
v = x.astype(np.float64)
maths[(x.size + 127) // 128, 128](m, cuda.to_device(v))
want = np.stack([np.exp(v), np.sin(v), np.sqrt(v), np.log1p(v), np.cos(v) * np.tanh(v),
                 np.arctan2(v, 2.0) + v ** 1.5], axis=1)
r["maths"] = bool(np.allclose(m.copy_to_host(), want, rtol=1e-14))
name = cuda.get_current_device().name
r["device"] = name.decode() if isinstance(name, bytes) else name
print(json.dumps(r))
"""


def test_numba_cuda_jit_kernels_run_on_the_native_driver(broker):
    """numba-cuda's own @cuda.jit dispatch (compile, link through cuLink*, load, launch, copies)
    with no Python-level shim: cuda-python's bindings call KubeCASH's libcuda.so.1."""
    import json
    import subprocess
    import sys

    from test_native_driver import RUN_TIMEOUT, _libdir
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECASH_", "NUMBA_"))}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker.address("alice"), KUBECASH_SHIM="0",
               NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0")
    p = subprocess.run([sys.executable, "-c", NATIVE_PROGRAM], env=env, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT * 2, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-4000:]
    v = json.loads(p.stdout.strip().splitlines()[-1])
    assert v["axpy"] and v["add2d"] and v["maths"], v
    assert v["sum"][0] == pytest.approx(v["sum"][1], rel=1e-4), v
    assert v["device"].startswith("KubeCASH CPU"), v
    assert "not supported" not in p.stderr, p.stderr[-3000:]
    assert broker.admin().call("status")["tenants"]["alice"]["devices"]["cpu0"]["kernels"] >= 3
