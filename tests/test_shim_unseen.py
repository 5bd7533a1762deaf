"""What trying the shim on cuda-python programs it had never seen turned up, as small programs
of our own in the same style (run in subprocesses with only KUBECASH_BROKER set, against a
real broker on the CPU backend): pointer attributes, stream queries, occupancy and function
limits, host functions ordered on a stream, profiler no-ops, pure cuda-python helpers, kernel
printf announced, and cuda.core refused with its reason instead of reaching the driver."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import run_client

pytest.importorskip("cuda.bindings.driver")

from kubecash.shim import inject  # noqa: E402
from kubecash.shim import table as T

PRELUDE = """
import ctypes, sys
import numpy as np
from cuda.bindings import driver as cuda, runtime as cudart, nvrtc

def check(result):
    if result[0].value:
        raise RuntimeError(f"CUDA error code={result[0].value}({result[0].name})")
    return None if len(result) == 1 else result[1] if len(result) == 2 else result[1:]

def compile_cubin(src, name=b"k.cu"):
    prog = check(nvrtc.nvrtcCreateProgram(src.encode(), name, 0, [], []))
    opts = [b"--gpu-architecture=sm_80"]
    check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts))
    n = check(nvrtc.nvrtcGetCUBINSize(prog))
    data = b" " * n
    check(nvrtc.nvrtcGetCUBIN(prog, data))
    return data
"""


def run(broker, body: str, timeout: float = 120) -> tuple[str, str]:
    p = run_client(PRELUDE + textwrap.dedent(body), broker.address("alice"))
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


DRIVER_PROGRAM = r"""
SCALE = '''
extern "C" __global__ void scale(float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
'''
check(cuda.cuInit(0))
dev = check(cuda.cuDeviceGet(0))
ctx = check(cuda.cuCtxCreate(None, 0, dev))
mod = check(cuda.cuModuleLoadData(compile_cubin(SCALE)))
fn = check(cuda.cuModuleGetFunction(mod, b"scale"))

# Pointer attributes of device memory, an interior pointer, and pinned host memory.
n = 4096
d = check(cuda.cuMemAlloc(4 * n))
A = cuda.CUpointer_attribute
MT = cuda.CUmemorytype
assert check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, d)) == MT.CU_MEMORYTYPE_DEVICE
assert int(check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_CONTEXT, d))) == int(ctx)
inner = cuda.CUdeviceptr(int(d) + 64)
assert int(check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, inner))) == int(d)
assert check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_RANGE_SIZE, inner)) == 4 * n
assert check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_IS_MANAGED, d)) is False
d2 = check(cuda.cuMemAlloc(64))
ids = [check(cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_BUFFER_ID, p)) for p in (d, d2)]
assert ids[0] != ids[1]
h = check(cuda.cuMemHostAlloc(4 * n, cuda.CU_MEMHOSTALLOC_DEVICEMAP))
hd = check(cuda.cuMemHostGetDevicePointer(h, 0))
types, ordinal, hp = check(cuda.cuPointerGetAttributes(
    3, [A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, A.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        A.CU_POINTER_ATTRIBUTE_HOST_POINTER], hd))
assert (types, ordinal, hp) == (MT.CU_MEMORYTYPE_HOST, 0, h), (types, ordinal, hp, h)
r = cuda.cuPointerGetAttribute(A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, cuda.CUdeviceptr(8))
assert r[0] == cuda.CUresult.CUDA_ERROR_INVALID_VALUE, r
print("pointer attributes: OK")

# Function limits and occupancy follow the device's own attributes.
DA = cuda.CUdevice_attribute
max_threads = check(cuda.cuDeviceGetAttribute(DA.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, dev))
sms = check(cuda.cuDeviceGetAttribute(DA.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev))
FA = cuda.CUfunction_attribute
assert check(cuda.cuFuncGetAttribute(FA.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn)) == max_threads
r = cuda.cuFuncGetAttribute(FA.CU_FUNC_ATTRIBUTE_NUM_REGS, fn)
assert r[0] == cuda.CUresult.CUDA_ERROR_NOT_SUPPORTED, r          # refused, never made up
per_sm = check(cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, 256, 0))
assert per_sm >= 1
assert check(cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, max_threads + 1, 0)) == 0
min_grid, block = check(cuda.cuOccupancyMaxPotentialBlockSize(fn, None, 0, 0))
assert 1 <= block <= max_threads and min_grid >= sms, (min_grid, block)
print("occupancy: OK", per_sm, min_grid, block)

# Stream queries.
assert check(cuda.cuCtxGetStreamPriorityRange()) == (0, 0)
s = check(cuda.cuStreamCreateWithPriority(cuda.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
assert check(cuda.cuStreamGetFlags(s)) == int(cuda.CUstream_flags.CU_STREAM_NON_BLOCKING)
assert check(cuda.cuStreamGetPriority(s)) == 0
assert int(check(cuda.cuStreamGetCtx(s))) == int(ctx)
print("stream queries: OK")

# A host function runs after the work queued before it, before the work queued after it.
x = np.arange(n, dtype=np.float32)
seen = []

@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def host_fn(user):
    # The kernel queued before has finished: the mapped pinned buffer holds its result.
    seen.append(("fn", ctypes.c_int.from_address(user).value,
                 float(np.ctypeslib.as_array((ctypes.c_float * n).from_address(h))[7])))

@ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
def stream_cb(stream, status, user):
    seen.append(("cb", status))

tag = ctypes.c_int(42)
check(cuda.cuMemcpyHtoDAsync(hd, x, 4 * n, s))
args = ((hd, 3.0, n), (None, ctypes.c_float, ctypes.c_int))
check(cuda.cuLaunchKernel(fn, n // 256, 1, 1, 256, 1, 1, 0, s, args, 0))
check(cuda.cuLaunchHostFunc(s, cuda.CUhostFn(ctypes.cast(host_fn, ctypes.c_void_p).value),
                            ctypes.addressof(tag)))
check(cuda.cuStreamAddCallback(s, cuda.CUstreamCallback(ctypes.cast(stream_cb, ctypes.c_void_p).value),
                               None, 0))
check(cuda.cuStreamSynchronize(s))
assert seen == [("fn", 42, 21.0), ("cb", 0)], seen
print("host functions: OK")

check(cuda.cuProfilerStart())
check(cuda.cuProfilerStop())
check(cuda.cuStreamDestroy(s))
check(cuda.cuMemFreeHost(h))
check(cuda.cuMemFree(d))
check(cuda.cuMemFree(d2))
check(cuda.cuCtxDestroy(ctx))
print("DRIVER OK")
"""


def test_driver_pointer_attributes_occupancy_stream_queries_and_host_functions(broker):
    out, err = run(broker, DRIVER_PROGRAM)
    assert "DRIVER OK" in out, out
    assert "CU_FUNC_ATTRIBUTE_NUM_REGS is not known" in err, err


RUNTIME_PROGRAM = r"""
PRINTING = '''
extern "C" __global__ void fill(int *out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2 * i;
    if (i == 0) printf("fill: n=%d\\n", n);
}
'''
check(cudart.cudaSetDevice(0))
least, greatest = check(cudart.cudaDeviceGetStreamPriorityRange())
s = check(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, greatest))
assert check(cudart.cudaStreamGetFlags(s)) == cudart.cudaStreamNonBlocking
assert check(cudart.cudaStreamGetPriority(s)) == 0

n = 1000
d = check(cudart.cudaMalloc(4 * n))
a = check(cudart.cudaPointerGetAttributes(d))
assert a.type == cudart.cudaMemoryType.cudaMemoryTypeDevice and a.device == 0
assert int(a.devicePointer) == int(d)
h = check(cudart.cudaHostAlloc(64, cudart.cudaHostAllocMapped))
a = check(cudart.cudaPointerGetAttributes(h))
assert a.type == cudart.cudaMemoryType.cudaMemoryTypeHost and int(a.hostPointer) == h
assert int(a.devicePointer) == int(check(cudart.cudaHostGetDevicePointer(h, 0)))
plain = np.zeros(4, np.int32)
a = check(cudart.cudaPointerGetAttributes(plain.ctypes.data))
assert a.type == cudart.cudaMemoryType.cudaMemoryTypeUnregistered
print("runtime pointer attributes: OK")

mod = check(cuda.cuModuleLoadData(compile_cubin(PRINTING)))
fill = check(cuda.cuModuleGetFunction(mod, b"fill"))
check(cuda.cuLaunchKernel(fill, 4, 1, 1, 256, 1, 1, 0, s, ((d, n), (ctypes.c_void_p, ctypes.c_int)), 0))
got = np.zeros(n, np.int32)
check(cudart.cudaMemcpyAsync(got, d, 4 * n, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s))
calls = []

@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def done(user):
    calls.append(int(got[n - 1]))

check(cudart.cudaLaunchHostFunc(s, cudart.cudaHostFn_t(ctypes.cast(done, ctypes.c_void_p).value), None))
check(cudart.cudaStreamSynchronize(s))
assert calls == [2 * (n - 1)], calls
assert (got == 2 * np.arange(n)).all()
print("runtime host function: OK")

# A pure helper works; the texture array it is for fails loudly, naming the call.
desc = check(cudart.cudaCreateChannelDesc(32, 0, 0, 0, cudart.cudaChannelFormatKind.cudaChannelFormatKindFloat))
assert desc.x == 32
r = cudart.cudaMalloc3DArray(desc, cudart.make_cudaExtent(8, 8, 6), cudart.cudaArrayCubemap)
assert r[0] == cudart.cudaError_t.cudaErrorNotSupported, r
check(cudart.cudaProfilerStart())
check(cudart.cudaProfilerStop())
check(cudart.cudaStreamDestroy(s))
check(cudart.cudaFree(d))
check(cudart.cudaFreeHost(h))
print("RUNTIME OK")
"""


def test_runtime_pointer_attributes_host_function_helpers_and_printf(broker):
    out, err = run(broker, RUNTIME_PROGRAM)
    assert "RUNTIME OK" in out, out
    assert "cudaMalloc3DArray is not supported" in err, err
    # Device printf reaches this program's stdout (delivered by the executor at the next call).
    assert "fill: n=" in out, out
    assert "cudaCreateChannelDesc" not in err, err


# -- cuda.core: compiled driver calls the shim cannot see are refused at import ----------------
def _python(code: str, broker: bool = True) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, under KUBECASH_BROKER (a broker that is not there:
    imports are decided before any call) or without it."""
    env = dict(os.environ, KUBECASH_BROKER="ipc:///nonexistent/kubecash/broker.sock")
    if not broker:
        env.pop("KUBECASH_BROKER")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_cuda_core_is_refused_with_its_reason_under_the_broker():
    code = textwrap.dedent("""
        try:
            from cuda.core import Device
        except ImportError as e:
            print("refused:", e)
        else:
            print("imported")
        import cuda.bindings.driver as d
        print(getattr(d, "__kubecash_shim__", None))
    """)
    r = _python(code)
    assert "refused: kubecash.shim: cuda.core calls the CUDA driver from compiled code" in r.stdout, \
        r.stdout + r.stderr
    assert r.stdout.strip().endswith("cuda.bindings.driver"), r.stdout


def test_cuda_bindings_nvml_is_refused_under_the_broker():
    """It would report the node's physical GPUs, not the tenant's view (#16)."""
    code = textwrap.dedent("""
        try:
            import cuda.bindings.nvml
        except ImportError as e:
            print("refused:", e)
        else:
            print("imported")
    """)
    r = _python(code)
    assert "refused: kubecash.shim: cuda.bindings.nvml reads the node's physical GPUs" in r.stdout, \
        r.stdout + r.stderr
    r = _python(code, broker=False)
    assert "imported" in r.stdout, r.stdout + r.stderr      # outside the broker: untouched


def test_refused_modules_agree_with_the_injector():
    assert inject.REFUSED_MODULES == T.REFUSED_MODULES
