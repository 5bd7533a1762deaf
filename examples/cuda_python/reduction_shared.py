"""A block reduction with `extern __shared__` memory and `__syncthreads()`, as NVIDIA's
clock_nvrtc sample (which finds each block's minimum): each block sums its slice into
dynamic shared memory, the host adds the partial sums.

    python reduction_shared.py [ptx|cubin]
"""
import sys

import numpy as np
from common import KernelHelper, checkCudaErrors, findCudaDevice
from cuda.bindings import driver as cuda

reduction = """\
extern "C" __global__ void blockSum(const float *input, float *partial, int n)
{
    extern __shared__ float sdata[];
    unsigned int tid = threadIdx.x;
    unsigned int i = blockIdx.x * (blockDim.x * 2) + threadIdx.x;
    float v = 0.0f;
    if (i < n) v += input[i];
    if (i + blockDim.x < n) v += input[i + blockDim.x];
    sdata[tid] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) sdata[tid] += sdata[tid + s];
        __syncthreads();
    }
    if (tid == 0) partial[blockIdx.x] = sdata[0];
}
"""

NUM_THREADS = 256


def main():
    use_cubin = (sys.argv[1] if len(sys.argv) > 1 else "ptx") == "cubin"
    n = 1 << 16
    hinput = (np.arange(n) % 97).astype(np.float32)
    blocks = (n + NUM_THREADS * 2 - 1) // (NUM_THREADS * 2)

    devID = findCudaDevice()
    kernelHelper = KernelHelper(reduction, devID, use_cubin=use_cubin)
    kernel = kernelHelper.getFunction(b"blockSum")

    dinput = checkCudaErrors(cuda.cuMemAlloc(hinput.nbytes))
    dpartial = checkCudaErrors(cuda.cuMemAlloc(blocks * 4))
    checkCudaErrors(cuda.cuMemsetD32(dpartial, 0, blocks))
    checkCudaErrors(cuda.cuMemcpyHtoD(dinput, hinput, hinput.nbytes))

    import ctypes
    args = ((dinput, dpartial, n), (None, None, ctypes.c_int))
    shared_memory_nbytes = NUM_THREADS * np.dtype(np.float32).itemsize
    checkCudaErrors(cuda.cuLaunchKernel(kernel, blocks, 1, 1, NUM_THREADS, 1, 1,
                                        shared_memory_nbytes, 0, args, 0))
    checkCudaErrors(cuda.cuCtxSynchronize())
    partial = np.empty(blocks, np.float32)
    checkCudaErrors(cuda.cuMemcpyDtoH(partial, dpartial, partial.nbytes))
    checkCudaErrors(cuda.cuMemFree(dinput))
    checkCudaErrors(cuda.cuMemFree(dpartial))
    kernelHelper.close()

    expect = hinput.reshape(blocks, -1).sum(axis=1, dtype=np.float64)
    if not np.array_equal(partial.astype(np.float64), expect) or partial.sum() != hinput.sum():
        print("Result = FAIL", file=sys.stderr)
        sys.exit(1)
    print(f"sum = {float(partial.sum(dtype=np.float64))}: PASS")


if __name__ == "__main__":
    main()
