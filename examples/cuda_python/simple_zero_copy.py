"""Vector add over mapped (zero-copy) host memory, as NVIDIA's simpleZeroCopy sample: the
kernel reads and writes pinned host memory through the device pointers
cudaHostGetDevicePointer returns (`drv`: cuMemHostAlloc / cuMemHostGetDevicePointer).

    python simple_zero_copy.py [rt|drv] [nelem]
"""
import ctypes
import math
import random as rnd
import sys

import numpy as np
from common import KernelHelper, checkCudaErrors
from cuda.bindings import driver as cuda
from cuda.bindings import runtime as cudart

simpleZeroCopy = """\
extern "C"
__global__ void vectorAddGPU(float *a, float *b, float *c, int N)
{
    int idx = blockIdx.x*blockDim.x + threadIdx.x;
    if (idx < N)
    {
        c[idx] = a[idx] + b[idx];
    }
}
"""


def main():
    use_driver = (sys.argv[1] if len(sys.argv) > 1 else "rt") == "drv"
    nelem = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    idev = 0
    checkCudaErrors(cudart.cudaSetDevice(idev))
    deviceProp = checkCudaErrors(cudart.cudaGetDeviceProperties(idev))
    if not deviceProp.canMapHostMemory:
        print(f"Device {idev} does not support mapping CPU host memory!", file=sys.stderr)
        sys.exit(2)
    checkCudaErrors(cudart.cudaSetDeviceFlags(cudart.cudaDeviceMapHost))

    num_bytes = nelem * np.dtype(np.float32).itemsize
    if use_driver:
        flags = cuda.CU_MEMHOSTALLOC_DEVICEMAP
        a_ptr = checkCudaErrors(cuda.cuMemHostAlloc(num_bytes, flags))
        b_ptr = checkCudaErrors(cuda.cuMemHostAlloc(num_bytes, flags))
        c_ptr = checkCudaErrors(cuda.cuMemHostAlloc(num_bytes, flags))
    else:
        flags = cudart.cudaHostAllocMapped
        a_ptr = checkCudaErrors(cudart.cudaHostAlloc(num_bytes, flags))
        b_ptr = checkCudaErrors(cudart.cudaHostAlloc(num_bytes, flags))
        c_ptr = checkCudaErrors(cudart.cudaHostAlloc(num_bytes, flags))
    a = (ctypes.c_float * nelem).from_address(a_ptr)
    b = (ctypes.c_float * nelem).from_address(b_ptr)
    c = (ctypes.c_float * nelem).from_address(c_ptr)

    rnd.seed(7)
    for n in range(nelem):
        a[n] = rnd.random()
        b[n] = rnd.random()

    if use_driver:
        d_a = checkCudaErrors(cuda.cuMemHostGetDevicePointer(a_ptr, 0))
        d_b = checkCudaErrors(cuda.cuMemHostGetDevicePointer(b_ptr, 0))
        d_c = checkCudaErrors(cuda.cuMemHostGetDevicePointer(c_ptr, 0))
        kernelArgs = ((d_a, d_b, d_c, nelem), (None, None, None, ctypes.c_int))
    else:
        d_a = checkCudaErrors(cudart.cudaHostGetDevicePointer(a, 0))
        d_b = checkCudaErrors(cudart.cudaHostGetDevicePointer(b, 0))
        d_c = checkCudaErrors(cudart.cudaHostGetDevicePointer(c, 0))
        kernelArgs = ((d_a, d_b, d_c, nelem),
                      (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int))

    block = cudart.dim3()
    block.x, block.y, block.z = 256, 1, 1
    grid = cudart.dim3()
    grid.x, grid.y, grid.z = math.ceil(nelem / float(block.x)), 1, 1
    kernelHelper = KernelHelper(simpleZeroCopy, idev)
    _vectorAddGPU = kernelHelper.getFunction(b"vectorAddGPU")
    checkCudaErrors(cuda.cuLaunchKernel(_vectorAddGPU, grid.x, grid.y, grid.z, block.x, block.y,
                                        block.z, 0, cuda.CU_STREAM_LEGACY, kernelArgs, 0))
    checkCudaErrors(cudart.cudaDeviceSynchronize())

    # Also copy out of the mapped memory with a plain copy (a device-to-device copy there).
    d_copy = checkCudaErrors(cudart.cudaMalloc(num_bytes))
    checkCudaErrors(cudart.cudaMemcpy(d_copy, c_ptr, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
    back = np.empty(nelem, np.float32)
    checkCudaErrors(cudart.cudaMemcpy(back, d_copy, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    checkCudaErrors(cudart.cudaFree(d_copy))

    errorNorm = refNorm = 0.0
    for n in range(nelem):
        ref = a[n] + b[n]
        diff = c[n] - ref
        errorNorm += diff * diff
        refNorm += ref * ref
    same = np.array_equal(back, np.ctypeslib.as_array(c))
    kernelHelper.close()
    if use_driver:
        for p in (a_ptr, b_ptr, c_ptr):
            checkCudaErrors(cuda.cuMemFreeHost(p))
    else:
        checkCudaErrors(cudart.cudaFreeHost(a))
        checkCudaErrors(cudart.cudaFreeHost(b))
        checkCudaErrors(cudart.cudaFreeHost(c))
    if errorNorm / refNorm >= 1.0e-7 or not same:
        print("FAILED", file=sys.stderr)
        sys.exit(1)
    print("zero-copy vector add: PASS")


if __name__ == "__main__":
    main()
