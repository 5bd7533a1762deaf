"""Helpers in the style of NVIDIA's cuda-python samples (common/helper_cuda.py,
common/common.py): checkCudaErrors, findCudaDevice, and a KernelHelper that compiles CUDA C
with NVRTC to PTX or CUBIN and loads it with cuModuleLoadData. Nothing here knows about
KubeCASH: these programs run unchanged on a real GPU."""
import numpy as np
from cuda.bindings import driver as cuda
from cuda.bindings import nvrtc
from cuda.bindings import runtime as cudart


def _cudaGetErrorEnum(error):
    if isinstance(error, cuda.CUresult):
        err, name = cuda.cuGetErrorName(error)
        return name if err == cuda.CUresult.CUDA_SUCCESS else "<unknown>"
    elif isinstance(error, cudart.cudaError_t):
        return cudart.cudaGetErrorName(error)[1]
    elif isinstance(error, nvrtc.nvrtcResult):
        return nvrtc.nvrtcGetErrorString(error)[1]
    raise RuntimeError(f"Unknown error type: {error}")


def checkCudaErrors(result):
    if result[0].value:
        raise RuntimeError(f"CUDA error code={result[0].value}({_cudaGetErrorEnum(result[0])})")
    if len(result) == 1:
        return None
    elif len(result) == 2:
        return result[1]
    return result[1:]


def findCudaDevice(devID=0):
    checkCudaErrors(cudart.cudaSetDevice(devID))
    return devID


def findCudaDeviceDRV(devID=0):
    checkCudaErrors(cuda.cuInit(0))
    return checkCudaErrors(cuda.cuDeviceGet(devID))


class KernelHelper:
    """Compile `code` with NVRTC for device `devID`: CUBIN (use_cubin) or PTX."""

    def __init__(self, code, devID, use_cubin=None, options=()):
        prog = checkCudaErrors(nvrtc.nvrtcCreateProgram(str.encode(code), b"sourceCode.cu", 0, None, None))
        checkCudaErrors(cudart.cudaFree(0))
        major = checkCudaErrors(
            cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, devID))
        minor = checkCudaErrors(
            cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, devID))
        if use_cubin is None:
            _, nvrtc_minor = checkCudaErrors(nvrtc.nvrtcVersion())
            use_cubin = nvrtc_minor >= 1
        prefix = "sm" if use_cubin else "compute"
        arch_arg = bytes(f"--gpu-architecture={prefix}_{major}{minor}", "ascii")
        opts = [b"--fmad=true", arch_arg, b"--std=c++17", b"-default-device", *options]
        try:
            checkCudaErrors(nvrtc.nvrtcCompileProgram(prog, len(opts), opts))
        except RuntimeError:
            logSize = checkCudaErrors(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * logSize
            checkCudaErrors(nvrtc.nvrtcGetProgramLog(prog, log))
            print(log.decode())
            raise
        if use_cubin:
            dataSize = checkCudaErrors(nvrtc.nvrtcGetCUBINSize(prog))
            data = b" " * dataSize
            checkCudaErrors(nvrtc.nvrtcGetCUBIN(prog, data))
        else:
            dataSize = checkCudaErrors(nvrtc.nvrtcGetPTXSize(prog))
            data = b" " * dataSize
            checkCudaErrors(nvrtc.nvrtcGetPTX(prog, data))
        self.module = checkCudaErrors(cuda.cuModuleLoadData(np.char.array(data)))

    def getFunction(self, name):
        return checkCudaErrors(cuda.cuModuleGetFunction(self.module, name))

    def close(self):
        checkCudaErrors(cuda.cuModuleUnload(self.module))
