"""What a program learns about its device: driver, runtime and pynvml views of memory.
Prints one line of JSON."""
import json

import pynvml
from common import checkCudaErrors
from cuda.bindings import driver as cuda
from cuda.bindings import runtime as cudart


def main():
    checkCudaErrors(cuda.cuInit(0))
    dev = checkCudaErrors(cuda.cuDeviceGet(0))
    ctx = checkCudaErrors(cuda.cuDevicePrimaryCtxRetain(dev))
    checkCudaErrors(cuda.cuCtxSetCurrent(ctx))
    out = {
        "count": checkCudaErrors(cuda.cuDeviceGetCount()),
        "total_mem": checkCudaErrors(cuda.cuDeviceTotalMem(dev)),
        "mem_info": list(checkCudaErrors(cuda.cuMemGetInfo())),
        "cc": list(checkCudaErrors(cuda.cuDeviceComputeCapability(dev))),
        "props_total": checkCudaErrors(cudart.cudaGetDeviceProperties(0)).totalGlobalMem,
    }
    ptr = checkCudaErrors(cuda.cuMemAlloc(1 << 20))
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    out["nvml"] = {"count": pynvml.nvmlDeviceGetCount(), "name": pynvml.nvmlDeviceGetName(h),
                   "total": mem.total, "used": mem.used, "free": mem.free}
    try:
        pynvml.nvmlDeviceGetUtilizationRates(h)
        out["nvml_util"] = "answered"
    except pynvml.NVMLError_NotSupported:
        out["nvml_util"] = "not supported"
    pynvml.nvmlShutdown()
    checkCudaErrors(cuda.cuMemFree(ptr))
    out["driver_version"] = checkCudaErrors(cuda.cuDriverGetVersion())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
