"""JIT saxpy on a stream, as NVIDIA's jit_program sample: NVRTC directly, a created stream,
async copies, and the kernel launched twice: once with its arguments as
((values...), (ctypes types...)), once as the address of an array of argument pointers
(the C form, each parameter's size taken from the kernel's signature).

    python jit_saxpy_streams.py [ptx|cubin]
"""
import ctypes
import sys

import numpy as np
from cuda.bindings import driver as cuda
from cuda.bindings import nvrtc


def ASSERT_DRV(err):
    if isinstance(err, cuda.CUresult):
        if err != cuda.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"Cuda Error: {err}")
    elif isinstance(err, nvrtc.nvrtcResult):
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"Nvrtc Error: {err}")
    else:
        raise RuntimeError(f"Unknown error type: {err}")


saxpy = """\
extern "C" __global__
void saxpy(float a, float *x, float *y, float *out, size_t n)
{
    size_t tid = blockIdx.x * blockDim.x + threadIdx.x;
    if (tid < n) {
        out[tid] = a * x[tid] + y[tid];
    }
}
"""


def main():
    use_cubin = (sys.argv[1] if len(sys.argv) > 1 else "ptx") == "cubin"
    (err,) = cuda.cuInit(0)
    ASSERT_DRV(err)
    err, cuDevice = cuda.cuDeviceGet(0)
    ASSERT_DRV(err)
    err, context = cuda.cuDevicePrimaryCtxRetain(cuDevice)
    ASSERT_DRV(err)
    (err,) = cuda.cuCtxSetCurrent(context)
    ASSERT_DRV(err)

    err, prog = nvrtc.nvrtcCreateProgram(str.encode(saxpy), b"saxpy.cu", 0, None, None)
    ASSERT_DRV(err)
    err, major = cuda.cuDeviceGetAttribute(
        cuda.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, cuDevice)
    ASSERT_DRV(err)
    err, minor = cuda.cuDeviceGetAttribute(
        cuda.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, cuDevice)
    ASSERT_DRV(err)
    prefix = "sm" if use_cubin else "compute"
    opts = [b"--fmad=false", bytes(f"--gpu-architecture={prefix}_{major}{minor}", "ascii")]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    ASSERT_DRV(err)
    if use_cubin:
        err, dataSize = nvrtc.nvrtcGetCUBINSize(prog)
        ASSERT_DRV(err)
        data = b" " * dataSize
        (err,) = nvrtc.nvrtcGetCUBIN(prog, data)
    else:
        err, dataSize = nvrtc.nvrtcGetPTXSize(prog)
        ASSERT_DRV(err)
        data = b" " * dataSize
        (err,) = nvrtc.nvrtcGetPTX(prog, data)
    ASSERT_DRV(err)
    (err,) = nvrtc.nvrtcDestroyProgram(prog)
    ASSERT_DRV(err)

    err, module = cuda.cuModuleLoadData(np.char.array(data))
    ASSERT_DRV(err)
    err, kernel = cuda.cuModuleGetFunction(module, b"saxpy")
    ASSERT_DRV(err)

    NUM_THREADS, NUM_BLOCKS = 128, 32
    a = np.float32(2.0)
    n = np.array(NUM_THREADS * NUM_BLOCKS, dtype=np.uint32)
    bufferSize = n * a.itemsize
    err, dX = cuda.cuMemAlloc(bufferSize)
    ASSERT_DRV(err)
    err, dY = cuda.cuMemAlloc(bufferSize)
    ASSERT_DRV(err)
    err, dOut = cuda.cuMemAlloc(bufferSize)
    ASSERT_DRV(err)

    hX = np.random.rand(n).astype(dtype=np.float32)
    hY = np.random.rand(n).astype(dtype=np.float32)
    hOut = np.zeros(n).astype(dtype=np.float32)

    err, stream = cuda.cuStreamCreate(cuda.CUstream_flags.CU_STREAM_NON_BLOCKING)
    ASSERT_DRV(err)
    err, start = cuda.cuEventCreate(0)
    ASSERT_DRV(err)
    err, stop = cuda.cuEventCreate(0)
    ASSERT_DRV(err)
    (err,) = cuda.cuMemcpyHtoDAsync(dX, hX, bufferSize, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuMemcpyHtoDAsync(dY, hY, bufferSize, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuStreamSynchronize(stream)
    ASSERT_DRV(err)

    arg_values = (a, dX, dY, dOut, n)
    arg_types = (ctypes.c_float, None, None, None, ctypes.c_size_t)
    (err,) = cuda.cuEventRecord(start, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuLaunchKernel(kernel, NUM_BLOCKS, 1, 1, NUM_THREADS, 1, 1, 0, stream,
                                 (arg_values, arg_types), 0)
    ASSERT_DRV(err)
    (err,) = cuda.cuEventRecord(stop, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuMemcpyDtoHAsync(hOut, dOut, bufferSize, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuStreamSynchronize(stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuStreamQuery(stream)
    ASSERT_DRV(err)
    err, ms = cuda.cuEventElapsedTime(start, stop)
    ASSERT_DRV(err)
    if not np.allclose(hOut, a * hX + hY):
        raise ValueError("tuple-form launch: wrong result")

    # The C form: an array of pointers to each argument's value.
    b = np.array([3.0], dtype=np.float32)
    pX = np.array([int(dX)], dtype=np.uint64)
    pY = np.array([int(dY)], dtype=np.uint64)
    pOut = np.array([int(dOut)], dtype=np.uint64)
    nn = np.array([int(n)], dtype=np.uint64)
    args = [b, pX, pY, pOut, nn]
    argv = np.array([arg.ctypes.data for arg in args], dtype=np.uint64)
    (err,) = cuda.cuLaunchKernel(kernel, NUM_BLOCKS, 1, 1, NUM_THREADS, 1, 1, 0, stream,
                                 argv.ctypes.data, 0)
    ASSERT_DRV(err)
    (err,) = cuda.cuMemcpyDtoHAsync(hOut, dOut, bufferSize, stream)
    ASSERT_DRV(err)
    (err,) = cuda.cuStreamSynchronize(stream)
    ASSERT_DRV(err)
    if not np.allclose(hOut, np.float32(3.0) * hX + hY):
        raise ValueError("pointer-array launch: wrong result")

    for ev in (start, stop):
        (err,) = cuda.cuEventDestroy(ev)
        ASSERT_DRV(err)
    (err,) = cuda.cuStreamDestroy(stream)
    ASSERT_DRV(err)
    for d in (dX, dY, dOut):
        (err,) = cuda.cuMemFree(d)
        ASSERT_DRV(err)
    (err,) = cuda.cuModuleUnload(module)
    ASSERT_DRV(err)
    (err,) = cuda.cuDevicePrimaryCtxRelease(cuDevice)
    ASSERT_DRV(err)
    print(f"saxpy on a stream: PASS ({ms:.3f} ms)")


if __name__ == "__main__":
    main()
