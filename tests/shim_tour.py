"""A tour of the brokered API surface, run by tests/test_shim_programs.py as an unmodified
program (python -c, only KUBECASH_BROKER set): return tuples, handle types, error codes."""
import ctypes
import os
import struct
import tempfile

import numpy as np
from cuda.bindings import driver as cu
from cuda.bindings import runtime as rt
from cuda.bindings._v2 import nvrtc as nv2

R = cu.CUresult
S = R.CUDA_SUCCESS

def ok(res):
    assert res[0] == S, res
    return res[1] if len(res) == 2 else (res[1:] if len(res) > 2 else None)

assert cu.cuDeviceGetCount()[0] == R.CUDA_ERROR_NOT_INITIALIZED
assert cu.__kubecash_shim__ == "cuda.bindings.driver"
ok(cu.cuInit(0))
dev = ok(cu.cuDeviceGet(0))
assert isinstance(dev, cu.CUdevice)
assert cu.cuDeviceGet(5)[0] == R.CUDA_ERROR_INVALID_DEVICE
uuid = ok(cu.cuDeviceGetUuid(dev))
assert len(uuid.bytes) == 16
# no context yet
assert cu.cuMemAlloc(16)[0] == R.CUDA_ERROR_INVALID_CONTEXT
ctx = ok(cu.cuCtxCreate(None, 0, dev))
assert int(ok(cu.cuCtxGetCurrent())) == int(ctx)
ctx2 = ok(cu.cuCtxCreate(None, 0, dev))
p2 = ok(cu.cuMemAlloc(1 << 20))
free_before = ok(cu.cuMemGetInfo())[0]
ok(cu.cuCtxDestroy(ctx2))                      # frees p2 with it
ok(cu.cuCtxSetCurrent(ctx))
free_after = ok(cu.cuMemGetInfo())[0]
assert free_after == free_before + (1 << 20), (free_before, free_after)
assert cu.cuMemFree(p2)[0] == R.CUDA_ERROR_INVALID_VALUE
ok(cu.cuCtxPushCurrent(ctx))
assert int(ok(cu.cuCtxPopCurrent())) == int(ctx)
assert int(ok(cu.cuCtxGetDevice())) == 0

# memory + pointer arithmetic + memset + unified copies
n = 1000
d = ok(cu.cuMemAlloc(4 * n))
ok(cu.cuMemsetD32(d, 0x3F800000, n))            # 1.0f
ok(cu.cuMemsetD8(cu.CUdeviceptr(int(d) + 4 * 10), 0, 4))
h = np.empty(n, np.float32)
ok(cu.cuMemcpy(h.ctypes.data, d, 4 * n))
assert h[10] == 0 and h[9] == 1 and h[11] == 1
base, size = ok(cu.cuMemGetAddressRange(cu.CUdeviceptr(int(d) + 100)))
assert int(base) == int(d) and size == 4 * n
d2 = ok(cu.cuMemAlloc(4 * n))
ok(cu.cuMemcpyDtoD(d2, d, 4 * n))
ok(cu.cuMemsetD16(d2, 0x1234, 4))
ok(cu.cuMemcpyDtoH(h, d2, 8))
assert h.view(np.uint16)[:4].tolist() == [0x1234] * 4
assert cu.cuMemcpyHtoD(d, h, 4 * n + 4)[0] == R.CUDA_ERROR_INVALID_VALUE   # h is too small
big = np.zeros(n + 1, np.float32)
assert cu.cuMemcpyHtoD(d, big, 4 * n + 4)[0] == R.CUDA_ERROR_INVALID_VALUE  # past the allocation

# pythonic NVRTC, a __device__ global, a module from a file, LoadDataEx
src = b'''
__device__ int counter = 5;
struct P { double x; float y; };
extern "C" __global__ void bump(int* out, P p, char c) { out[0] = counter + (int)p.x + (int)p.y + c; counter += 1; }
'''
prog = nv2.create_program(src, b"g.cu", None, None)
nv2.compile_program(prog, [b"-arch=compute_80", b"-DUNUSED=1", b"-lineinfo"])
ptx = nv2.get_ptx(prog)
nv2.destroy_program(prog)
path = os.path.join(tempfile.mkdtemp(), "k.ptx")
open(path, "wb").write(ptx)
mod = ok(cu.cuModuleLoad(path.encode()))
gptr, gsize = ok(cu.cuModuleGetGlobal(mod, b"counter"))
assert gsize == 4
k = ok(cu.cuModuleGetFunction(mod, b"bump"))
class P(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_float)]
out = ok(cu.cuMemAlloc(4))
ok(cu.cuLaunchKernel(k, 1, 1, 1, 1, 1, 1, 0, cu.CU_STREAM_LEGACY,
                     ((out, P(10.0, 20.0), 3), (None, None, ctypes.c_char)), 0))
o = np.zeros(1, np.int32)
ok(cu.cuMemcpyDtoH(o, out, 4))
assert o[0] == 5 + 10 + 20 + 3, o
ok(cu.cuLaunchKernel(k, 1, 1, 1, 1, 1, 1, 0, 0, ((out, P(0.0, 0.0), 0), (None, None, ctypes.c_char)), 0))
ok(cu.cuMemcpyDtoH(o, out, 4))
assert o[0] == 6, o          # the __device__ global persisted
# wrong argument count / size: refused at once
assert cu.cuLaunchKernel(k, 1, 1, 1, 1, 1, 1, 0, 0, ((out,), (None,)), 0)[0] == R.CUDA_ERROR_INVALID_VALUE
mod2 = ok(cu.cuModuleLoadDataEx(ptx, 0, [], []))
mod3 = ok(cu.cuModuleLoadData(ctypes.c_char_p(ptx).value and ctypes.cast(ctypes.c_char_p(ptx), ctypes.c_void_p).value))
ok(cu.cuModuleUnload(mod2))
ok(cu.cuModuleUnload(mod3))
assert cu.cuModuleUnload(mod2)[0] == R.CUDA_ERROR_INVALID_HANDLE

# PTX NVRTC never produced here runs (the CPU backend translates it); SASS does not
hand = b".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k() { ret; }\n"
ok(cu.cuModuleUnload(ok(cu.cuModuleLoadData(hand))))
cubin = (b"\x7fELF\x02\x01\x01\x33\x08" + bytes(7) + struct.pack("<HHI", 2, 190, 1) + bytes(24)
         + struct.pack("<I", 0x6005004) + bytes(12))          # an sm_80 CUBIN's ELF header
assert cu.cuModuleLoadData(cubin)[0] == R.CUDA_ERROR_NO_BINARY_FOR_GPU
assert cu.cuModuleLoadData(b"\x7fELF\x02\x01\x01" + bytes(57))[0] == R.CUDA_ERROR_INVALID_IMAGE

# streams, events, queries
st = ok(cu.cuStreamCreate(0))
e1, e2 = ok(cu.cuEventCreate(0)), ok(cu.cuEventCreate(0))
ok(cu.cuEventRecord(e1, st))
ok(cu.cuMemsetD32Async(d, 7, n, st))
ok(cu.cuEventRecord(e2, st))
ok(cu.cuStreamWaitEvent(0, e2, 0))
ok(cu.cuEventSynchronize(e2))
ok(cu.cuEventQuery(e2))
ok(cu.cuStreamQuery(st))
ms = ok(cu.cuEventElapsedTime(e1, e2))
assert isinstance(ms, float) and ms >= 0
ok(cu.cuMemcpyDtoHAsync(h, d, 4 * n, st))
ok(cu.cuStreamSynchronize(st))
assert (h.view(np.uint32) == 7).all()
ok(cu.cuEventDestroy(e1))
ok(cu.cuEventDestroy(e2))
ok(cu.cuStreamDestroy(st))
assert cu.cuStreamSynchronize(st)[0] == R.CUDA_ERROR_INVALID_HANDLE

# pinned memory: copies to/from it travel as device-to-device copies
hp = ok(cu.cuMemAllocHost(4 * n))
arr = np.ctypeslib.as_array((ctypes.c_float * n).from_address(hp))
arr[:] = np.arange(n)
ok(cu.cuMemcpyHtoD(d, hp, 4 * n))
ok(cu.cuMemsetD32(d2, 0, n))
ok(cu.cuMemcpyDtoH(hp + 0, d2, 8))
assert arr[0] == 0 and arr[1] == 0 and arr[2] == 2
ok(cu.cuMemcpyDtoH(h, d, 4 * n))
assert (h == np.arange(n)).all()
assert ok(cu.cuMemHostGetFlags(hp)) & cu.CU_MEMHOSTALLOC_DEVICEMAP
ok(cu.cuMemFreeHost(hp))
# registered memory: bookkeeping, no zero-copy
reg = np.zeros(256, np.float32)
ok(cu.cuMemHostRegister(reg, reg.nbytes, 0))
assert cu.cuMemHostGetDevicePointer(reg, 0)[0] == R.CUDA_ERROR_NOT_SUPPORTED
ok(cu.cuMemcpyDtoH(reg, d, reg.nbytes))
assert (reg == np.arange(256)).all()
ok(cu.cuMemHostUnregister(reg))

# error names, unsupported calls
assert ok(cu.cuGetErrorName(R.CUDA_ERROR_OUT_OF_MEMORY)) == b"CUDA_ERROR_OUT_OF_MEMORY"
assert ok(cu.cuGetErrorString(R.CUDA_ERROR_OUT_OF_MEMORY)) == b"out of memory"
assert cu.cuGraphCreate(0) == (R.CUDA_ERROR_NOT_SUPPORTED, None)
assert cu.cuGraphCreate(0)[0] == R.CUDA_ERROR_NOT_SUPPORTED
assert cu.cuCtxGetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE) == (R.CUDA_ERROR_NOT_SUPPORTED, None)

# runtime side
E = rt.cudaError_t
assert rt.cudaMalloc(1 << 40)[0] == E.cudaErrorMemoryAllocation
assert rt.cudaGetLastError() == (E.cudaErrorMemoryAllocation,)
assert rt.cudaGetLastError() == (E.cudaSuccess,)
assert rt.cudaGetErrorName(E.cudaErrorMemoryAllocation) == (E.cudaSuccess, b"cudaErrorMemoryAllocation")
s = ok(rt.cudaStreamCreate())
assert isinstance(s, rt.cudaStream_t)
ok(rt.cudaStreamQuery(s))
ok(rt.cudaStreamDestroy(s))
ok(rt.cudaMemsetAsync(int(d), 0, 16, 0))
ok(rt.cudaMemcpyAsync(h, int(d), 16, rt.cudaMemcpyKind.cudaMemcpyDefault, 0))
ok(rt.cudaStreamSynchronize(0))
assert (h[:4] == 0).all()
ok(cu.cuMemFree(d))
ok(cu.cuMemFree(d2))
ok(cu.cuMemFree(out))
ok(cu.cuModuleUnload(mod))
ok(cu.cuCtxDestroy(ctx))
print("TOUR OK")
