"""Driver-API vector add, as NVIDIA's vectorAddDrv sample: NVRTC compiles the kernel to PTX
(`ptx`) or CUBIN (`cubin`), cuModuleLoadData loads it, cuLaunchKernel runs it with its
arguments given as ((values...), (ctypes types...)).

    python vector_add_drv.py [ptx|cubin] [N]
"""
import ctypes
import math
import sys

import numpy as np
from common import KernelHelper, checkCudaErrors, findCudaDeviceDRV
from cuda.bindings import driver as cuda

vectorAddDrv = """\
extern "C" __global__ void VecAdd_kernel(const float *A, const float *B, float *C, int N)
{
    int i = blockDim.x * blockIdx.x + threadIdx.x;
    if (i < N)
        C[i] = A[i] + B[i];
}
"""


def main():
    use_cubin = (sys.argv[1] if len(sys.argv) > 1 else "ptx") == "cubin"
    N = int(sys.argv[2]) if len(sys.argv) > 2 else 50000
    nbytes = N * np.dtype(np.float32).itemsize

    checkCudaErrors(cuda.cuInit(0))
    cuDevice = findCudaDeviceDRV()
    cuContext = checkCudaErrors(cuda.cuCtxCreate(None, 0, cuDevice))
    name = checkCudaErrors(cuda.cuDeviceGetName(256, cuDevice))
    print("device:", name.split(b"\0")[0].decode())
    uvaSupported = checkCudaErrors(
        cuda.cuDeviceGetAttribute(cuda.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, cuDevice))
    assert uvaSupported

    kernelHelper = KernelHelper(vectorAddDrv, int(cuDevice), use_cubin=use_cubin)
    _VecAdd_kernel = kernelHelper.getFunction(b"VecAdd_kernel")

    h_A = np.random.rand(N).astype(dtype=np.float32)
    h_B = np.random.rand(N).astype(dtype=np.float32)
    h_C = np.zeros(N, dtype=np.float32)

    d_A = checkCudaErrors(cuda.cuMemAlloc(nbytes))
    d_B = checkCudaErrors(cuda.cuMemAlloc(nbytes))
    d_C = checkCudaErrors(cuda.cuMemAlloc(nbytes))
    checkCudaErrors(cuda.cuMemcpyHtoD(d_A, h_A, nbytes))
    checkCudaErrors(cuda.cuMemcpyHtoD(d_B, h_B, nbytes))

    threadsPerBlock = 256
    blocksPerGrid = (N + threadsPerBlock - 1) / threadsPerBlock   # a float, as in the sample
    kernelArgs = ((d_A, d_B, d_C, N), (None, None, None, ctypes.c_int))
    checkCudaErrors(cuda.cuLaunchKernel(_VecAdd_kernel, blocksPerGrid, 1, 1, threadsPerBlock, 1, 1,
                                        0, 0, kernelArgs, 0))
    checkCudaErrors(cuda.cuMemcpyDtoH(h_C, d_C, nbytes))

    err = max(math.fabs(c - (a + b)) for a, b, c in zip(h_A[:1000], h_B[:1000], h_C[:1000], strict=True))
    ok = np.array_equal(h_C, h_A + h_B)

    checkCudaErrors(cuda.cuMemFree(d_A))
    checkCudaErrors(cuda.cuMemFree(d_B))
    checkCudaErrors(cuda.cuMemFree(d_C))
    kernelHelper.close()
    checkCudaErrors(cuda.cuCtxDestroy(cuContext))
    if not ok or err > 1e-7:
        print("Result = FAIL", file=sys.stderr)
        sys.exit(1)
    print("Result = PASS")


if __name__ == "__main__":
    main()
