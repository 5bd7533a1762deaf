"""A cuda.core program, unmodified: NVRTC compiles a kernel, cuda.core launches it on a stream
and allocates from the device's memory pool; copies go through cuda.bindings. Brokered by
KubeCASH's libcuda.so.1 with nothing but the loader path and the broker's address:

    LD_LIBRARY_PATH=$(kubecash-libdir) KUBECASH_BROKER=ipc:///…/broker.sock KUBECASH_SHIM=0 \\
        python examples/cuda_core_saxpy.py

(KUBECASH_SHIM=0: the Python-level shim stays out, so cuda-python's own compiled bindings
call the native driver.) On a CPU device the kernel is compiled to PTX, which the device runs."""
from __future__ import annotations

import numpy as np
from cuda.bindings import driver as drv
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch

CODE = r"""
extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}"""


def check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def main() -> None:
    dev = Device()
    dev.set_current()
    stream = dev.create_stream()
    kernel = Program(CODE, code_type="c++", options=ProgramOptions(arch="compute_80")).compile("ptx") \
        .get_kernel("saxpy")
    n = 1 << 16
    x = np.arange(n, dtype=np.float32)
    y = np.ones(n, dtype=np.float32)
    dx, dy = dev.allocate(x.nbytes, stream=stream), dev.allocate(y.nbytes, stream=stream)
    check(drv.cuMemcpyHtoD(int(dx.handle), x.ctypes.data, x.nbytes))
    check(drv.cuMemcpyHtoD(int(dy.handle), y.ctypes.data, y.nbytes))
    launch(stream, LaunchConfig(grid=(n + 255) // 256, block=256), kernel, np.float32(2.0), dx, dy, np.int32(n))
    stream.sync()
    out = np.empty_like(y)
    check(drv.cuMemcpyDtoH(out.ctypes.data, int(dy.handle), out.nbytes))
    assert np.array_equal(out, 2 * x + 1), "wrong result"
    free, total = check(drv.cuMemGetInfo())
    print(f"OK saxpy on {dev.name}: {n} elements; memory {total >> 20} MiB total (the quota), {free >> 20} MiB free")


if __name__ == "__main__":
    main()
