"""What a program learns about its device: driver, runtime and pynvml views of memory.
Prints one line of JSON."""
import json
import os

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
    out["nvml_util"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    out["nvml_pids"] = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    out["pid"] = os.getpid()
    try:
        pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        out["nvml_temperature"] = "answered"
    except pynvml.NVMLError_NotSupported:
        out["nvml_temperature"] = "not supported"
    pynvml.nvmlShutdown()
    checkCudaErrors(cuda.cuMemFree(ptr))
    out["driver_version"] = checkCudaErrors(cuda.cuDriverGetVersion())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
