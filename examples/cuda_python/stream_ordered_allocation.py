"""Stream-ordered allocation timed with events, as NVIDIA's streamOrderedAllocation sample:
cudaMallocAsync / cudaFreeAsync on a non-blocking stream, the default memory pool's release
threshold, and cudaEventElapsedTime over MAX_ITER iterations.

    python stream_ordered_allocation.py [nelem]
"""
import ctypes
import math
import sys

import numpy as np
from common import KernelHelper, checkCudaErrors, findCudaDevice
from cuda.bindings import driver as cuda
from cuda.bindings import runtime as cudart

streamOrderedAllocation = """\
/* Add two vectors on the GPU */
extern "C"
__global__ void vectorAddGPU(const float *a, const float *b, float *c, int N)
{
    int idx = blockIdx.x*blockDim.x + threadIdx.x;
    if (idx < N) {
        c[idx] =  a[idx] + b[idx];
    }
}
"""
MAX_ITER = 5


def launch(stream, d_a, d_b, d_c, nelem):
    block = cudart.dim3()
    block.x, block.y, block.z = 256, 1, 1
    grid = cudart.dim3()
    grid.x, grid.y, grid.z = math.ceil(nelem / float(block.x)), 1, 1
    kernelArgs = ((d_a, d_b, d_c, nelem),
                  (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int))
    checkCudaErrors(cuda.cuLaunchKernel(_vectorAddGPU, grid.x, grid.y, grid.z, block.x, block.y,
                                        block.z, 0, stream, kernelArgs, 0))


def check(a, b, c):
    return np.linalg.norm(c - (a + b)) / np.linalg.norm(a + b) < 1.0e-6


def basicStreamOrderedAllocation(dev, nelem, a, b, c):
    num_bytes = nelem * np.dtype(np.float32).itemsize
    print("Starting basicStreamOrderedAllocation()")
    checkCudaErrors(cudart.cudaSetDevice(dev))
    stream = checkCudaErrors(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    d_a = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
    d_b = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
    d_c = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
    checkCudaErrors(cudart.cudaMemcpyAsync(d_a, a, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    checkCudaErrors(cudart.cudaMemcpyAsync(d_b, b, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    launch(stream, d_a, d_b, d_c, nelem)
    checkCudaErrors(cudart.cudaFreeAsync(d_a, stream))
    checkCudaErrors(cudart.cudaFreeAsync(d_b, stream))
    checkCudaErrors(cudart.cudaMemcpyAsync(c, d_c, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    checkCudaErrors(cudart.cudaFreeAsync(d_c, stream))
    checkCudaErrors(cudart.cudaStreamSynchronize(stream))
    ok = check(a, b, c)
    checkCudaErrors(cudart.cudaStreamDestroy(stream))
    return ok


def streamOrderedAllocationPostSync(dev, nelem, a, b, c):
    num_bytes = nelem * np.dtype(np.float32).itemsize
    print("Starting streamOrderedAllocationPostSync()")
    checkCudaErrors(cudart.cudaSetDevice(dev))
    stream = checkCudaErrors(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    start = checkCudaErrors(cudart.cudaEventCreate())
    end = checkCudaErrors(cudart.cudaEventCreate())
    memPool = checkCudaErrors(cudart.cudaDeviceGetDefaultMemPool(dev))
    thresholdVal = cuda.cuuint64_t(ctypes.c_uint64(-1).value)
    checkCudaErrors(cudart.cudaMemPoolSetAttribute(memPool, cudart.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                                   thresholdVal))
    checkCudaErrors(cudart.cudaEventRecord(start, stream))
    for _i in range(MAX_ITER):
        d_a = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
        d_b = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
        d_c = checkCudaErrors(cudart.cudaMallocAsync(num_bytes, stream))
        checkCudaErrors(cudart.cudaMemcpyAsync(d_a, a, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        checkCudaErrors(cudart.cudaMemcpyAsync(d_b, b, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        launch(stream, d_a, d_b, d_c, nelem)
        checkCudaErrors(cudart.cudaFreeAsync(d_a, stream))
        checkCudaErrors(cudart.cudaFreeAsync(d_b, stream))
        checkCudaErrors(cudart.cudaMemcpyAsync(c, d_c, num_bytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        checkCudaErrors(cudart.cudaFreeAsync(d_c, stream))
        checkCudaErrors(cudart.cudaStreamSynchronize(stream))
    checkCudaErrors(cudart.cudaEventRecord(end, stream))
    checkCudaErrors(cudart.cudaEventSynchronize(end))
    msecTotal = checkCudaErrors(cudart.cudaEventElapsedTime(start, end))
    print(f"Total elapsed time = {msecTotal} ms over {MAX_ITER} iterations")
    high = checkCudaErrors(cudart.cudaMemPoolGetAttribute(memPool, cudart.cudaMemPoolAttr.cudaMemPoolAttrUsedMemHigh))
    print(f"pool high-water mark = {int(high)} bytes")
    ok = check(a, b, c) and msecTotal > 0 and int(high) == 3 * num_bytes
    checkCudaErrors(cudart.cudaEventDestroy(start))
    checkCudaErrors(cudart.cudaEventDestroy(end))
    checkCudaErrors(cudart.cudaStreamDestroy(stream))
    return ok


def main():
    cuda.cuInit(0)
    dev = findCudaDevice()
    version = checkCudaErrors(cudart.cudaDriverGetVersion())
    isMemPoolSupported = version >= 11030 and checkCudaErrors(
        cudart.cudaDeviceGetAttribute(cuda.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, dev))
    if not isMemPoolSupported:
        print("Waiving execution as device does not support Memory Pools", file=sys.stderr)
        sys.exit(2)
    global _vectorAddGPU
    kernelHelper = KernelHelper(streamOrderedAllocation, dev)
    _vectorAddGPU = kernelHelper.getFunction(b"vectorAddGPU")
    nelem = int(sys.argv[1]) if len(sys.argv) > 1 else 1048576
    rng = np.random.default_rng(3)
    a = rng.random(nelem, dtype=np.float32)
    b = rng.random(nelem, dtype=np.float32)
    c = np.zeros(nelem, dtype="float32")
    ret1 = basicStreamOrderedAllocation(dev, nelem, a, b, c)
    ret2 = streamOrderedAllocationPostSync(dev, nelem, a, b, c)
    kernelHelper.close()
    if not ret1 or not ret2:
        print("FAILED", file=sys.stderr)
        sys.exit(1)
    print("stream-ordered allocation: PASS")


if __name__ == "__main__":
    main()
