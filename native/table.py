"""What libcuda.so.1 does with each driver API entry point: one entry per exported symbol.

"broker": forwarded to the broker or the tenant's executor (native/src/cuda_api.c, and
native/src/cuda_exec.c for modules, launches, streams, events, async copies and memset,
native/src/cuda_more.c for host functions, 2D/3D copies and memsets, stream-ordered
allocation and pools);
"local": answered inside the library, no message sent (the same files).
Every other symbol the CUDA headers declare is generated as a stub that returns
CUDA_ERROR_NOT_SUPPORTED and logs its name once (native/gen.py writes the stubs).
The role shim/table.py plays for the Python shim: native/gen.py refuses a name here that the
headers do not declare, and the library's link fails for a name here with no C definition
(-z defs) or one defined in C but missing here (a duplicate of its stub).
"""
from __future__ import annotations

BROKER, LOCAL = "broker", "local"

DRIVER: dict[str, str] = {
    "cuInit": BROKER,                     # opens the session (hello)
    "cuDriverGetVersion": LOCAL,
    "cuGetErrorName": LOCAL,
    "cuGetErrorString": LOCAL,
    "cuGetProcAddress": LOCAL,
    "cuGetProcAddress_v2": LOCAL,
    "cuGetExportTable": LOCAL,            # the runtime's private tables (native/src/export_tables.c)
    "cuModuleGetLoadingMode": LOCAL,      # cudart asks at start-up (native/src/runtime_init.c)
    "cuCtxGetLimit": LOCAL,               # kept per device, reported back (runtime_init.c)
    "cuCtxSetLimit": LOCAL,
    "cuCtxGetCacheConfig": LOCAL,
    "cuCtxSetCacheConfig": LOCAL,
    "cuCtxGetSharedMemConfig": LOCAL,
    "cuCtxSetSharedMemConfig": LOCAL,
    "cuCtxGetStreamPriorityRange": LOCAL,  # [0, 0]: no stream priorities
    "cuProfilerStart": LOCAL,             # no-ops (cudaProfiler.h's; native/src/runtime_init.c)
    "cuProfilerStop": LOCAL,
    "cuDeviceGetCount": LOCAL,            # from the hello reply's device list
    "cuDeviceGet": LOCAL,
    "cuDeviceGetName": LOCAL,
    "cuDeviceGetUuid": LOCAL,
    "cuDeviceGetUuid_v2": LOCAL,
    "cuDeviceTotalMem_v2": LOCAL,         # the tenant's memory quota
    "cuDeviceGetAttribute": LOCAL,        # from the device description (shim/devattr.py's table)
    "cuDeviceGetPCIBusId": LOCAL,         # its "pci" location (a CPU device's: 0000:00:<index>.0)
    "cuDeviceGetByPCIBusId": LOCAL,
    "cuDeviceComputeCapability": LOCAL,
    "cuDevicePrimaryCtxRetain": BROKER,   # open_device + attach, once per device
    "cuDevicePrimaryCtxRelease_v2": LOCAL,
    "cuDevicePrimaryCtxRelease": LOCAL,   # the 7.0 name: the same prototype and meaning
    "cuCtxGetCurrent": LOCAL,
    "cuCtxCreate": LOCAL,                 # a context of the device's session, pushed current
    "cuCtxCreate_v2": LOCAL,
    "cuCtxCreate_v3": LOCAL,              # without execution affinity
    "cuCtxCreate_v4": LOCAL,              # without execution affinity or CIG parameters
    "cuCtxDestroy": LOCAL,                # its allocations, streams, events and modules go
    "cuCtxDestroy_v2": LOCAL,
    # the driver's logs (native/src/cuda_logs.c): this library's own messages
    "cuLogsRegisterCallback": LOCAL,
    "cuLogsUnregisterCallback": LOCAL,
    "cuLogsCurrent": LOCAL,
    "cuLogsDumpToFile": LOCAL,
    "cuLogsDumpToMemory": LOCAL,
    "cuCtxSetCurrent": LOCAL,
    "cuCtxGetDevice": LOCAL,
    "cuCtxSynchronize": BROKER,           # ctx_sync
    "cuCtxSynchronize_v2": BROKER,        # ctx_sync (13.0: the context named, or the current one)
    "cuCtxGetDevice_v2": LOCAL,
    "cuCtxPushCurrent_v2": LOCAL,         # the calling thread's context stack
    "cuCtxPopCurrent_v2": LOCAL,
    "cuCtxGetApiVersion": LOCAL,
    "cuCtxGetId": LOCAL,
    "cuCtxGetFlags": LOCAL,
    "cuDevicePrimaryCtxGetState": LOCAL,
    "cuDevicePrimaryCtxSetFlags_v2": LOCAL,
    "cuDevicePrimaryCtxReset_v2": BROKER,  # ctx_sync, then mem_free of the device's allocations
    "cuDevicePrimaryCtxReset": BROKER,    # the 7.0 name: the same
    "cuMemAlloc_v2": BROKER,
    "cuMemFree_v2": BROKER,
    "cuMemGetInfo_v2": BROKER,
    "cuMemcpyHtoD_v2": BROKER,
    "cuMemcpyDtoH_v2": BROKER,
    "cuMemcpyHtoD_v2_ptds": BROKER,       # as the above (cudart built for per-thread streams)
    "cuMemcpyDtoH_v2_ptds": BROKER,
    # -- native/src/cuda_exec.c --------------------------------------------------------------
    # modules: images are PTX (to its NUL), fatbins (size from the header; cudart's wrapper
    # {0x466243b1, version, data} too) or 64-bit ELF (size from its headers)
    "cuModuleLoadData": BROKER,           # module_load
    "cuModuleLoadDataEx": BROKER,         # JIT options ignored; log buffers left empty strings
    "cuModuleLoadFatBinary": BROKER,
    "cuModuleLoad": BROKER,               # reads the file here
    "cuModuleUnload": BROKER,             # module_unload
    "cuModuleGetFunction": BROKER,        # get_function (its param_sizes pack kernelParams)
    "cuModuleGetGlobal_v2": BROKER,       # get_global
    # libraries: one module each, on the current context's device; a CUkernel is its CUfunction
    "cuLibraryLoadData": BROKER,
    "cuLibraryLoadFromFile": BROKER,
    "cuLibraryUnload": BROKER,
    "cuLibraryGetKernel": BROKER,         # get_function
    "cuLibraryGetModule": LOCAL,
    "cuLibraryGetGlobal": BROKER,         # get_global
    "cuKernelGetFunction": LOCAL,
    "cuFuncGetAttribute": LOCAL,          # device limits; static sizes and registers read 0
    "cuFuncSetAttribute": LOCAL,          # max dynamic shared size, carveout; others NOT_SUPPORTED
    "cuFuncSetCacheConfig": LOCAL,        # a hint
    "cuKernelGetAttribute": LOCAL,        # a CUkernel's: its function's, on any device
    "cuKernelSetAttribute": LOCAL,
    # occupancy from the device's limits (a kernel uses no registers or static shared memory
    # here); clusters NOT_SUPPORTED
    "cuOccupancyMaxActiveBlocksPerMultiprocessor": LOCAL,
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags": LOCAL,
    "cuOccupancyMaxPotentialBlockSize": LOCAL,
    "cuOccupancyMaxPotentialBlockSizeWithFlags": LOCAL,
    "cuOccupancyAvailableDynamicSMemPerBlock": LOCAL,
    # launches: posted ("async"), errors at the next synchronization
    "cuLaunchKernel": BROKER,
    "cuLaunchKernel_ptsz": BROKER,
    "cuLaunchCooperativeKernel": BROKER,  # every block resident at once (grid.sync)
    "cuLaunchCooperativeKernel_ptsz": BROKER,
    "cuLaunchKernelEx": BROKER,           # attributes that change nothing accepted, others refused by name
    "cuLaunchKernelEx_ptsz": BROKER,
    # streams (0, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD: the executor's default stream)
    "cuStreamCreate": BROKER,
    "cuStreamCreateWithPriority": BROKER,  # priorities: the range is (0, 0)
    "cuStreamDestroy_v2": BROKER,
    "cuStreamDestroy": BROKER,             # the same prototype
    "cuStreamSynchronize": BROKER,
    "cuStreamSynchronize_ptsz": BROKER,
    "cuStreamQuery": BROKER,
    "cuStreamQuery_ptsz": BROKER,
    "cuStreamWaitEvent": BROKER,
    "cuStreamWaitEvent_ptsz": BROKER,
    "cuStreamGetPriority": LOCAL,
    "cuStreamGetPriority_ptsz": LOCAL,
    "cuStreamGetFlags": LOCAL,
    "cuStreamGetFlags_ptsz": LOCAL,
    "cuStreamIsCapturing": LOCAL,          # NONE, ACTIVE or INVALIDATED (native/src/cuda_graph.c)
    "cuStreamIsCapturing_ptsz": LOCAL,
    # events
    "cuEventCreate": BROKER,
    "cuEventDestroy_v2": BROKER,
    "cuEventDestroy": BROKER,
    "cuEventRecord": BROKER,
    "cuEventRecord_ptsz": BROKER,
    "cuEventRecordWithFlags": BROKER,
    "cuEventRecordWithFlags_ptsz": BROKER,
    "cuEventSynchronize": BROKER,
    "cuEventQuery": BROKER,
    "cuEventElapsedTime": BROKER,
    "cuEventElapsedTime_v2": BROKER,
    # copies and memset (cuMemcpy's direction: this session's allocations are device memory)
    "cuMemcpyHtoDAsync_v2": BROKER,
    "cuMemcpyHtoDAsync_v2_ptsz": BROKER,
    "cuMemcpyDtoHAsync_v2": BROKER,
    "cuMemcpyDtoHAsync_v2_ptsz": BROKER,
    "cuMemcpyDtoD_v2": BROKER,
    "cuMemcpyDtoD_v2_ptds": BROKER,
    "cuMemcpyDtoDAsync_v2": BROKER,
    "cuMemcpyDtoDAsync_v2_ptsz": BROKER,
    "cuMemcpy": BROKER,
    "cuMemcpy_ptds": BROKER,
    "cuMemcpyAsync": BROKER,
    "cuMemcpyAsync_ptsz": BROKER,
    # between two devices of the tenant (also cuMemcpy/cuMemcpyDtoD when the pointers say so):
    # through the program, in pieces; peer access from kernels is not offered
    "cuMemcpyPeer": BROKER,
    "cuMemcpyPeer_ptds": BROKER,
    "cuMemcpyPeerAsync": BROKER,
    "cuMemcpyPeerAsync_ptsz": BROKER,
    "cuDeviceCanAccessPeer": LOCAL,       # 0: each device is its own executor process
    "cuMemsetD8_v2": BROKER,
    "cuMemsetD8_v2_ptds": BROKER,
    "cuMemsetD16_v2": BROKER,
    "cuMemsetD16_v2_ptds": BROKER,
    "cuMemsetD32_v2": BROKER,
    "cuMemsetD32_v2_ptds": BROKER,
    "cuMemsetD8Async": BROKER,
    "cuMemsetD8Async_ptsz": BROKER,
    "cuMemsetD16Async": BROKER,
    "cuMemsetD16Async_ptsz": BROKER,
    "cuMemsetD32Async": BROKER,
    "cuMemsetD32Async_ptsz": BROKER,
    "cuPointerGetAttribute": LOCAL,       # from this library's records of allocations and pinned blocks
    "cuPointerGetAttributes": LOCAL,      # unknown addresses: CUDA's defaults (memory type 0)
    # pinned host memory: page-aligned host memory of this process (not charged, not mapped)
    "cuMemAllocHost_v2": LOCAL,
    "cuMemHostAlloc": LOCAL,
    "cuMemFreeHost": LOCAL,
    "cuMemHostGetDevicePointer_v2": LOCAL,  # a DEVICEMAP block's: the executor's mapping of it
    "cuMemHostGetFlags": LOCAL,
    # -- native/src/cuda_more.c ------------------------------------------------------------
    # host functions: run by this library's worker thread once a marker event recorded after
    # the stream's earlier work completes; later work on the stream is sent after them
    "cuLaunchHostFunc": BROKER,
    "cuLaunchHostFunc_ptsz": BROKER,
    "cuStreamAddCallback": BROKER,
    "cuStreamAddCallback_ptsz": BROKER,
    # 2D/3D copies and 2D memsets: row loops over the 1D ones (CUDA arrays: NOT_SUPPORTED)
    "cuMemcpy2D_v2": BROKER,
    "cuMemcpy2D_v2_ptds": BROKER,
    "cuMemcpy2DUnaligned_v2": BROKER,
    "cuMemcpy2DUnaligned_v2_ptds": BROKER,
    "cuMemcpy2DAsync_v2": BROKER,
    "cuMemcpy2DAsync_v2_ptsz": BROKER,
    "cuMemcpy3D_v2": BROKER,
    "cuMemcpy3D_v2_ptds": BROKER,
    "cuMemcpy3DAsync_v2": BROKER,
    "cuMemcpy3DAsync_v2_ptsz": BROKER,
    "cuMemsetD2D8_v2": BROKER,
    "cuMemsetD2D8_v2_ptds": BROKER,
    "cuMemsetD2D16_v2": BROKER,
    "cuMemsetD2D16_v2_ptds": BROKER,
    "cuMemsetD2D32_v2": BROKER,
    "cuMemsetD2D32_v2_ptds": BROKER,
    "cuMemsetD2D8Async": BROKER,
    "cuMemsetD2D8Async_ptsz": BROKER,
    "cuMemsetD2D16Async": BROKER,
    "cuMemsetD2D16Async_ptsz": BROKER,
    "cuMemsetD2D32Async": BROKER,
    "cuMemsetD2D32Async_ptsz": BROKER,
    # stream-ordered allocation: mem_alloc at the call (the quota's OOM there), mem_free
    # posted (run after the work queued before it); pools are bookkeeping in this library
    "cuMemAllocAsync": BROKER,
    "cuMemAllocAsync_ptsz": BROKER,
    "cuMemAllocFromPoolAsync": BROKER,
    "cuMemAllocFromPoolAsync_ptsz": BROKER,
    "cuMemFreeAsync": BROKER,
    "cuMemFreeAsync_ptsz": BROKER,
    "cuMemPoolCreate": LOCAL,             # shareable handle types refused (cross-process)
    "cuMemPoolDestroy": LOCAL,
    "cuDeviceGetDefaultMemPool": LOCAL,
    "cuDeviceGetMemPool": LOCAL,
    "cuDeviceSetMemPool": LOCAL,
    "cuMemPoolSetAttribute": LOCAL,
    "cuMemPoolGetAttribute": LOCAL,       # reserved = used: nothing is cached
    "cuMemPoolTrimTo": LOCAL,
}

# -- native/src/cuda_graph.c: graphs -----------------------------------------------------------
# A capture records launches, async copies and memsets, host functions, event records and
# waits made on the stream as a chain of nodes; explicit graphs take kernel, memset, host,
# event and empty nodes with their dependencies. A launch replays the nodes, in an order the
# dependencies allow, on its stream; cuGraphExecUpdate puts another graph's parameters into an
# instantiated one of the same topology. Memory nodes, child graphs, captures across streams
# and the other node kinds: NOT_SUPPORTED.
DRIVER.update({name: LOCAL for name in (
    "cuStreamBeginCapture", "cuStreamBeginCapture_ptsz", "cuStreamBeginCapture_v2", "cuStreamBeginCapture_v2_ptsz",
    "cuStreamEndCapture", "cuStreamEndCapture_ptsz", "cuStreamGetCaptureInfo", "cuStreamGetCaptureInfo_ptsz",
    "cuStreamGetCaptureInfo_v2", "cuStreamGetCaptureInfo_v2_ptsz", "cuStreamGetCaptureInfo_v3",
    "cuStreamGetCaptureInfo_v3_ptsz", "cuThreadExchangeStreamCaptureMode",
    "cuGraphCreate", "cuGraphDestroy", "cuGraphGetNodes", "cuGraphAddEmptyNode", "cuGraphAddKernelNode",
    "cuGraphAddKernelNode_v2", "cuGraphAddMemsetNode", "cuGraphAddHostNode", "cuGraphAddEventRecordNode",
    "cuGraphAddEventWaitNode", "cuGraphKernelNodeGetParams", "cuGraphKernelNodeGetParams_v2",
    "cuGraphKernelNodeSetParams", "cuGraphKernelNodeSetParams_v2", "cuGraphInstantiateWithFlags",
    "cuGraphInstantiateWithParams", "cuGraphInstantiateWithParams_ptsz", "cuGraphExecDestroy",
    "cuGraphExecKernelNodeSetParams", "cuGraphExecKernelNodeSetParams_v2", "cuGraphExecUpdate",
    "cuGraphExecUpdate_v2")})
DRIVER.update({name: BROKER for name in (    # the graph's work, sent as its calls would be
    "cuGraphLaunch", "cuGraphLaunch_ptsz", "cuGraphUpload", "cuGraphUpload_ptsz")})

# -- native/src/cuda_vmm.c: virtual memory management (CPU devices; the executor's ops_vmm.py) --
# Reservations, physical allocations (charged to the quota), mappings and access are the
# executor's; handles, properties and retain counts are kept here. Shareable handles
# (cuMemExportToShareableHandle, cuMemImportFromShareableHandle) are cross-process: stubs.
DRIVER.update({name: BROKER for name in (
    "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap", "cuMemUnmap",
    "cuMemSetAccess")})
DRIVER.update({name: LOCAL for name in (
    "cuMemGetAllocationGranularity", "cuMemGetAccess", "cuMemRetainAllocationHandle",
    "cuMemGetAllocationPropertiesFromHandle")})

# -- native/src/cuda_link.c: the JIT linker, PTX only (the executor translates PTX at load) --
DRIVER.update({name: LOCAL for name in (
    "cuLinkCreate", "cuLinkCreate_v2", "cuLinkAddData", "cuLinkAddData_v2", "cuLinkAddFile",
    "cuLinkAddFile_v2", "cuLinkComplete", "cuLinkDestroy")})

NVML: dict[str, str] = {
    "nvmlInit_v2": BROKER,
    "nvmlInit": BROKER,
    "nvmlShutdown": LOCAL,
    "nvmlErrorString": LOCAL,
    "nvmlDeviceGetCount_v2": LOCAL,
    "nvmlDeviceGetCount": LOCAL,
    "nvmlDeviceGetHandleByIndex_v2": LOCAL,
    "nvmlDeviceGetHandleByIndex": LOCAL,
    "nvmlDeviceGetName": LOCAL,
    "nvmlDeviceGetMemoryInfo": BROKER,    # status: the tenant's use on the device
    "nvmlDeviceGetMemoryInfo_v2": BROKER,
    "nvmlInitWithFlags": BROKER,
    "nvmlDeviceGetIndex": LOCAL,
    "nvmlDeviceGetUUID": LOCAL,           # "GPU-" and cuDeviceGetUuid's bytes
    "nvmlDeviceGetHandleByUUID": LOCAL,
    "nvmlDeviceGetHandleByPciBusId_v2": LOCAL,   # cuDeviceGetPCIBusId's form (PyTorch asks)
    "nvmlDeviceGetHandleByPciBusId": LOCAL,
    "nvmlDeviceGetCudaComputeCapability": LOCAL,
    "nvmlDeviceGetMultiGpuBoard": LOCAL,
    "nvmlDeviceGetUtilizationRates": BROKER,   # the tenant's share of the device's last second
    "nvmlDeviceGetComputeRunningProcesses_v3": BROKER,   # its sessions' pids with the device open
    "nvmlDeviceGetComputeRunningProcesses_v2": BROKER,
    "nvmlDeviceGetComputeRunningProcesses": BROKER,      # the v1 records {pid, usedGpuMemory}
    "nvmlSystemGetDriverVersion": LOCAL,  # "kubecash-<version>", as the shim says
    "nvmlSystemGetNVMLVersion": LOCAL,
    "nvmlSystemGetCudaDriverVersion": LOCAL,   # cuDriverGetVersion's
    "nvmlSystemGetCudaDriverVersion_v2": LOCAL,
}

# Every other NVML entry point is exported as a NOT_SUPPORTED stub: native/gen.py lists them
# from nvidia-ml-py's pynvml (no nvml.h ships with the pip packages or the toolkit here).
# PyTorch, for one, looks up NVLink and fabric calls and refuses to start without them.

# Protocol messages the C side sends, per channel (native/gen.py emits their names and
# fields from kubecash.client.protocol's export and fails if one is gone).
MESSAGES_USED: dict[str, tuple[str, ...]] = {
    "tenant": ("hello", "heartbeat", "open_device", "status", "close"),
    "executor": ("attach", "mem_alloc", "mem_free", "mem_info", "memcpy_htod", "memcpy_dtoh", "ctx_sync",
                 "memcpy_dtod", "memset", "module_load", "module_unload", "get_function", "get_global",
                 "launch", "stream_create", "stream_destroy", "stream_sync", "stream_query",
                 "stream_wait_event", "event_create", "event_destroy", "event_record", "event_sync",
                 "event_query", "event_elapsed", "batch", "vmm_reserve", "vmm_free", "vmm_create",
                 "vmm_release", "vmm_map", "vmm_unmap", "vmm_access", "host_alloc", "host_mapped", "host_free"),
    "event": ("stdout", "executor_died", "session_ended", "throttled"),
}
