"""Every call the shim intercepts, in one table: module, name, and how it is answered.

    BROKERED     a request to the broker or the tenant's executor (kubecash.client)
    LOCAL        answered in the program without the broker (error names, versions, NVRTC,
                 bookkeeping such as flags and hints)
    UNSUPPORTED  returns CUDA_ERROR_NOT_SUPPORTED / cudaErrorNotSupported (pynvml:
                 NVMLError_NotSupported) and logs the call's name once

A call of the real module that is not listed is UNSUPPORTED too (never passed to the real
driver, which would escape the broker); its types, enums and constants are re-exported
from the real module so isinstance and == comparisons hold. NVRTC is the exception: it
compiles in the program and cannot reach a device, so its unlisted calls pass through
(PASSTHROUGH_UNLISTED). tests/test_shim_table.py checks that every name listed here exists
in cuda-python's own modules and that every BROKERED/LOCAL row has an implementation.
"""
from __future__ import annotations

BROKERED, LOCAL, UNSUPPORTED = "brokered", "local", "unsupported"

DRIVER = "cuda.bindings.driver"
RUNTIME = "cuda.bindings.runtime"
NVRTC = "cuda.bindings.nvrtc"
NVRTC_V2 = "cuda.bindings._v2.nvrtc"        # the pythonic NVRTC bindings
PYNVML = "pynvml"

# Import names that resolve to the brokered modules: the legacy cuda-python names are the
# same modules under their old names.
ALIASES = {
    DRIVER: DRIVER, RUNTIME: RUNTIME, NVRTC: NVRTC, NVRTC_V2: NVRTC_V2, PYNVML: PYNVML,
    "cuda.cuda": DRIVER, "cuda.cudart": RUNTIME, "cuda.nvrtc": NVRTC,
}

# Modules that would reach the real driver from compiled code, out of the shim's reach: under
# KUBECASH_BROKER importing them fails with this reason instead of using a device behind the
# broker's back (quotas, isolation). A name here covers its submodules.
REFUSED_MODULES = {
    "cuda.core": "cuda.core calls the CUDA driver from compiled code (cuda.bindings.cydriver), "
                 "which the KubeCASH shim cannot broker; under KUBECASH_BROKER it is refused "
                 "rather than let it use a device outside the broker. Use cuda.bindings.driver "
                 "or cuda.bindings.runtime (brokered), or unset KUBECASH_BROKER.",
    "cuda.bindings.nvml": "cuda.bindings.nvml reads the node's physical GPUs through the real NVML, "
                          "outside the tenant's view of its devices and quota; under KUBECASH_BROKER "
                          "it is refused. Use pynvml (brokered: the tenant's devices, its memory "
                          "quota as total memory), or unset KUBECASH_BROKER.",
}

# What counts as an API call of each module (a callable, not a type, named so): unlisted
# ones become UNSUPPORTED; everything else of the real module is re-exported.
API_PREFIXES = {DRIVER: ("cu",), RUNTIME: ("cuda",), NVRTC: ("nvrtc",), NVRTC_V2: (),
                PYNVML: ("nvml", "_nvml", "c_nvml")}
PASSTHROUGH_UNLISTED = {NVRTC, NVRTC_V2}


def _rows(kind: str, names: str) -> dict[str, str]:
    return {n: kind for n in names.split()}


TABLE: dict[str, dict[str, str]] = {
    DRIVER: {
        **_rows(BROKERED, """
            cuInit cuDeviceGetCount cuDeviceGet cuDeviceGetName cuDeviceGetAttribute
            cuDeviceTotalMem cuDeviceComputeCapability cuDeviceGetUuid cuDeviceCanAccessPeer
            cuDeviceGetDefaultMemPool cuDeviceGetMemPool
            cuCtxCreate cuCtxDestroy cuCtxSetCurrent cuCtxGetCurrent cuCtxPushCurrent
            cuCtxPopCurrent cuCtxGetDevice cuCtxGetFlags cuCtxSynchronize
            cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease cuDevicePrimaryCtxReset
            cuDevicePrimaryCtxGetState cuDevicePrimaryCtxSetFlags
            cuMemAlloc cuMemFree cuMemGetInfo cuMemGetAddressRange
            cuMemAllocHost cuMemHostAlloc cuMemFreeHost cuMemHostGetDevicePointer cuMemHostGetFlags
            cuMemHostRegister cuMemHostUnregister
            cuMemcpyHtoD cuMemcpyDtoH cuMemcpyDtoD cuMemcpyHtoDAsync cuMemcpyDtoHAsync
            cuMemcpyDtoDAsync cuMemcpy cuMemcpyAsync
            cuMemsetD8 cuMemsetD16 cuMemsetD32 cuMemsetD8Async cuMemsetD16Async cuMemsetD32Async
            cuMemAllocAsync cuMemAllocFromPoolAsync cuMemFreeAsync
            cuMemPoolGetAttribute cuMemPoolSetAttribute cuMemPoolTrimTo
            cuModuleLoadData cuModuleLoadDataEx cuModuleLoadFatBinary cuModuleLoad cuModuleUnload
            cuModuleGetFunction cuModuleGetGlobal cuFuncSetCacheConfig cuFuncSetAttribute
            cuLaunchKernel
            cuStreamCreate cuStreamCreateWithPriority cuStreamDestroy cuStreamSynchronize
            cuStreamQuery cuStreamWaitEvent
            cuEventCreate cuEventRecord cuEventSynchronize cuEventQuery cuEventElapsedTime
            cuEventDestroy
            cuLaunchHostFunc cuStreamAddCallback
        """),
        **_rows(LOCAL, """
            cuDriverGetVersion cuGetErrorName cuGetErrorString
            cuPointerGetAttribute cuPointerGetAttributes cuFuncGetAttribute
            cuOccupancyMaxActiveBlocksPerMultiprocessor
            cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags cuOccupancyMaxPotentialBlockSize
            cuCtxGetStreamPriorityRange cuStreamGetFlags cuStreamGetPriority cuStreamGetCtx
            cuStreamGetDevice cuProfilerStart cuProfilerStop
        """),
        # Listed for the record (unlisted calls behave the same): what samples use that a
        # brokered device does not offer.
        **_rows(UNSUPPORTED, """
            cuMemAllocManaged cuMemCreate cuMemMap cuMemUnmap cuMemRelease cuMemAddressReserve
            cuMemAddressFree cuMemSetAccess cuMemGetAllocationGranularity cuMemcpyPeer
            cuMemcpyPeerAsync cuCtxEnablePeerAccess cuIpcGetMemHandle cuIpcOpenMemHandle
            cuLaunchCooperativeKernel cuLaunchKernelEx
            cuStreamBeginCapture cuStreamEndCapture cuGraphCreate cuGraphInstantiate
            cuGraphLaunch cuTexObjectCreate cuSurfObjectCreate cuArrayCreate cuArray3DCreate
            cuMipmappedArrayCreate cuLinkCreate cuLinkAddData cuLinkComplete cuLibraryLoadData
            cuLibraryGetKernel cuDeviceGetPCIBusId cuGetProcAddress cuCtxGetApiVersion
        """),
    },
    RUNTIME: {
        **_rows(BROKERED, """
            cudaGetDeviceCount cudaSetDevice cudaGetDevice cudaInitDevice cudaSetDeviceFlags
            cudaGetDeviceFlags cudaDeviceGetAttribute cudaGetDeviceProperties
            cudaDeviceSynchronize cudaDeviceReset cudaDeviceCanAccessPeer
            cudaMalloc cudaFree cudaMemGetInfo cudaMallocHost cudaHostAlloc cudaFreeHost
            cudaHostGetDevicePointer cudaHostGetFlags cudaHostRegister cudaHostUnregister
            cudaMemcpy cudaMemcpyAsync cudaMemset cudaMemsetAsync
            cudaMallocAsync cudaMallocFromPoolAsync cudaFreeAsync cudaDeviceGetDefaultMemPool
            cudaDeviceGetMemPool cudaMemPoolSetAttribute cudaMemPoolGetAttribute cudaMemPoolTrimTo
            cudaStreamCreate cudaStreamCreateWithFlags cudaStreamCreateWithPriority
            cudaStreamDestroy cudaStreamSynchronize cudaStreamQuery cudaStreamWaitEvent
            cudaEventCreate cudaEventCreateWithFlags cudaEventRecord cudaEventSynchronize
            cudaEventQuery cudaEventElapsedTime cudaEventDestroy
            cudaLaunchHostFunc cudaStreamAddCallback
        """),
        **_rows(LOCAL, """
            cudaDriverGetVersion cudaRuntimeGetVersion cudaGetErrorName cudaGetErrorString
            cudaGetLastError cudaPeekAtLastError
            cudaPointerGetAttributes cudaDeviceGetStreamPriorityRange cudaStreamGetFlags
            cudaStreamGetPriority cudaStreamGetDevice cudaProfilerStart cudaProfilerStop
        """),
        # A pure helper of cuda-python (builds a struct, calls no driver): passed through.
        **_rows(LOCAL + ":passthrough", "cudaCreateChannelDesc"),
        **_rows(UNSUPPORTED, """
            cudaMallocManaged cudaMallocPitch cudaMalloc3D cudaMallocArray cudaMemcpy2D
            cudaMemcpy3D cudaMemcpyPeer cudaDeviceEnablePeerAccess cudaIpcGetMemHandle
            cudaIpcOpenMemHandle cudaMalloc3DArray
            cudaStreamBeginCapture cudaStreamEndCapture cudaGraphCreate cudaGraphInstantiate
            cudaGraphLaunch cudaCreateTextureObject cudaCreateSurfaceObject
            cudaFuncGetAttributes cudaLibraryLoadData
            cudaLibraryGetKernel cudaGraphicsMapResources cudaMemAdvise cudaMemPrefetchAsync
        """),
    },
    NVRTC: {
        # The real NVRTC's, and the program's PTX filed under the CUBIN's bytes (images.py).
        **_rows(LOCAL, "nvrtcGetCUBIN"),
        # Passed to the real NVRTC unchanged (listed here for the record).
        **_rows(LOCAL + ":passthrough", """
            nvrtcCreateProgram nvrtcCompileProgram nvrtcDestroyProgram nvrtcGetPTX
            nvrtcVersion nvrtcGetPTXSize nvrtcGetCUBINSize nvrtcGetProgramLogSize
            nvrtcGetProgramLog nvrtcGetErrorString nvrtcAddNameExpression nvrtcGetLoweredName
            nvrtcGetNumSupportedArchs nvrtcGetSupportedArchs nvrtcGetLTOIRSize nvrtcGetLTOIR
            nvrtcGetOptiXIRSize nvrtcGetOptiXIR
        """),
    },
    NVRTC_V2: {
        **_rows(LOCAL, "get_cubin"),
        **_rows(LOCAL + ":passthrough", """
            create_program compile_program destroy_program get_ptx version get_ptx_size
            get_cubin_size get_program_log get_program_log_size
            get_error_string add_name_expression get_lowered_name get_supported_archs
            get_num_supported_archs
        """),
    },
    PYNVML: {
        **_rows(BROKERED, """
            nvmlInit nvmlInitWithFlags nvmlShutdown nvmlDeviceGetCount
            nvmlDeviceGetHandleByIndex nvmlDeviceGetHandleByUUID nvmlDeviceGetIndex
            nvmlDeviceGetUUID nvmlDeviceGetName nvmlDeviceGetMemoryInfo
            nvmlDeviceGetCudaComputeCapability nvmlDeviceGetMultiGpuBoard
            nvmlDeviceGetUtilizationRates nvmlDeviceGetComputeRunningProcesses
            nvmlDeviceGetComputeRunningProcesses_v2 nvmlDeviceGetComputeRunningProcesses_v3
        """),
        **_rows(LOCAL, """
            nvmlSystemGetDriverVersion nvmlSystemGetCudaDriverVersion
            nvmlSystemGetCudaDriverVersion_v2 nvmlSystemGetNVMLVersion
        """),
        # Pure helpers of the pynvml module that never call NVML.
        **_rows(LOCAL + ":passthrough", "nvmlStructToFriendlyObject nvmlFriendlyObjectToStruct"),
        **_rows(UNSUPPORTED, """
            nvmlDeviceGetBAR1MemoryInfo nvmlDeviceGetTemperature nvmlDeviceGetPowerUsage
            nvmlDeviceGetClockInfo nvmlDeviceGetPciInfo nvmlDeviceGetPersistenceMode
        """),
    },
}


def kind(module: str, name: str) -> str:
    """How `module.name` is answered (UNSUPPORTED when not listed)."""
    k = TABLE.get(module, {}).get(name, UNSUPPORTED)
    return k.split(":")[0]


def passthrough(module: str, name: str) -> bool:
    return TABLE.get(module, {}).get(name, "").endswith(":passthrough")
