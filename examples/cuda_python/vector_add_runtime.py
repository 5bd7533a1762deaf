"""Runtime-API vector add: cudaMalloc / cudaMemcpy / cudaMemset, the legacy `cuda.cudart`
and `cuda.cuda` module names, the kernel compiled by NVRTC and launched with its arguments
given the C way (an array of pointers to the argument values).

    python vector_add_runtime.py [ptx|cubin] [N]
"""
import sys

import numpy as np
from common import KernelHelper, checkCudaErrors
from cuda import cuda, cudart  # legacy names: the same modules as cuda.bindings.*

KERNEL = """\
extern "C" __global__ void vadd(const double *a, const double *b, double *c, unsigned int n)
{
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
"""


def main():
    use_cubin = (sys.argv[1] if len(sys.argv) > 1 else "ptx") == "cubin"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_003
    checkCudaErrors(cudart.cudaFree(0))
    count = checkCudaErrors(cudart.cudaGetDeviceCount())
    assert count >= 1
    checkCudaErrors(cudart.cudaSetDevice(0))
    print("runtime", checkCudaErrors(cudart.cudaRuntimeGetVersion()),
          "driver", checkCudaErrors(cudart.cudaDriverGetVersion()))
    free0, total = checkCudaErrors(cudart.cudaMemGetInfo())

    a = np.random.default_rng(1).random(n)
    b = np.random.default_rng(2).random(n)
    d_a = checkCudaErrors(cudart.cudaMalloc(a.nbytes))
    d_b = checkCudaErrors(cudart.cudaMalloc(b.nbytes))
    d_c = checkCudaErrors(cudart.cudaMalloc(a.nbytes))
    free1, _ = checkCudaErrors(cudart.cudaMemGetInfo())
    # At least what was asked for: allocations take whole pages (on a GPU, whole units).
    assert 3 * a.nbytes <= free0 - free1 < 3 * a.nbytes + (3 << 21), (free0, free1)
    checkCudaErrors(cudart.cudaMemcpy(d_a, a, a.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
    checkCudaErrors(cudart.cudaMemcpy(d_b, b, b.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDefault))
    checkCudaErrors(cudart.cudaMemset(d_c, 0, a.nbytes))

    helper = KernelHelper(KERNEL, 0, use_cubin=use_cubin)
    k = helper.getFunction(b"vadd")
    # The C form of kernelParams: void*[] holding the address of each argument's value.
    vals = [np.array([d_a], np.uint64), np.array([d_b], np.uint64),
            np.array([d_c + 0], np.uint64), np.array([n], np.uint32)]
    params = np.array([v.ctypes.data for v in vals], dtype=np.uint64)
    checkCudaErrors(cuda.cuLaunchKernel(k, (n + 255) // 256, 1, 1, 256, 1, 1, 0, 0, params.ctypes.data, 0))
    checkCudaErrors(cudart.cudaDeviceSynchronize())
    c = np.empty(n)
    checkCudaErrors(cudart.cudaMemcpy(c, d_c, c.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    # Pointer arithmetic on device pointers: copy the second half back on its own.
    half = np.empty(n - n // 2)
    checkCudaErrors(cudart.cudaMemcpy(half, d_c + 8 * (n // 2), half.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    for p in (d_a, d_b, d_c):
        checkCudaErrors(cudart.cudaFree(p))
    helper.close()
    if not (np.array_equal(c, a + b) and np.array_equal(half, c[n // 2:])):
        print("FAILED", file=sys.stderr)
        sys.exit(1)
    print(f"runtime vector add: PASS (quota {total} bytes)")


if __name__ == "__main__":
    main()
