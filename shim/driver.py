"""Brokered implementations of cuda.bindings.driver calls: the module the brokered
cuda.bindings.driver is built from (build.populate looks every BROKERED and LOCAL row of
the table up here by name, and runtime.py and nvml.py call the helpers shared with the
runtime API through it).

Each function has the real one's name and parameters and returns the outputs after the
result code (the module builder adds the CUresult and turns failures into codes). Handle
types are cuda-python's own (CUdeviceptr, CUcontext, CUstream...).

The calls live in one module per family; this one gathers them:

    drv_device   cuInit, device queries, contexts and primary contexts
    drv_memory   allocations, pinned and registered host memory, stream-ordered allocation,
                 memory pools, pointer attributes
    drv_copy     copies and memsets
    drv_module   module loads, functions, launches, function attributes, occupancy
    drv_stream   streams, events, stream queries, host functions
    drv_local    profiler no-ops, error names and strings (answered in the program)
"""
from __future__ import annotations

from typing import Any

from . import drv_device, drv_local, drv_memory, drv_module, drv_stream
from .drv_copy import (  # noqa: F401 - re-exported
    cuMemcpy,
    cuMemcpyAsync,
    cuMemcpyDtoD,
    cuMemcpyDtoDAsync,
    cuMemcpyDtoH,
    cuMemcpyDtoHAsync,
    cuMemcpyHtoD,
    cuMemcpyHtoDAsync,
    cuMemsetD8,
    cuMemsetD8Async,
    cuMemsetD16,
    cuMemsetD16Async,
    cuMemsetD32,
    cuMemsetD32Async,
)
from .drv_device import (  # noqa: F401 - re-exported
    cuCtxCreate,
    cuCtxDestroy,
    cuCtxGetCurrent,
    cuCtxGetDevice,
    cuCtxGetFlags,
    cuCtxPopCurrent,
    cuCtxPushCurrent,
    cuCtxSetCurrent,
    cuCtxSynchronize,
    cuDeviceCanAccessPeer,
    cuDeviceComputeCapability,
    cuDeviceGet,
    cuDeviceGetAttribute,
    cuDeviceGetCount,
    cuDeviceGetDefaultMemPool,
    cuDeviceGetMemPool,
    cuDeviceGetName,
    cuDeviceGetUuid,
    cuDevicePrimaryCtxGetState,
    cuDevicePrimaryCtxRelease,
    cuDevicePrimaryCtxReset,
    cuDevicePrimaryCtxRetain,
    cuDevicePrimaryCtxSetFlags,
    cuDeviceTotalMem,
    cuDriverGetVersion,
    cuInit,
)
from .drv_local import (  # noqa: F401 - re-exported
    cuGetErrorName,
    cuGetErrorString,
    cuProfilerStart,
    cuProfilerStop,
)
from .drv_memory import (  # noqa: F401 - re-exported
    _POOL_U64,
    _pool_attr_name,
    _pool_dev,
    cuMemAlloc,
    cuMemAllocAsync,
    cuMemAllocFromPoolAsync,
    cuMemAllocHost,
    cuMemFree,
    cuMemFreeAsync,
    cuMemFreeHost,
    cuMemGetAddressRange,
    cuMemGetInfo,
    cuMemHostAlloc,
    cuMemHostGetDevicePointer,
    cuMemHostGetFlags,
    cuMemHostRegister,
    cuMemHostUnregister,
    cuMemPoolGetAttribute,
    cuMemPoolSetAttribute,
    cuMemPoolTrimTo,
    cuPointerGetAttribute,
    cuPointerGetAttributes,
    device_pointer_of_host,
    host_register,
    host_unregister,
    pointer_info,
    pool_get,
    pool_set,
)
from .drv_module import (  # noqa: F401 - re-exported
    blocks_per_sm,
    cuFuncGetAttribute,
    cuFuncSetAttribute,
    cuFuncSetCacheConfig,
    cuLaunchKernel,
    cuModuleGetFunction,
    cuModuleGetGlobal,
    cuModuleLoad,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleLoadFatBinary,
    cuModuleUnload,
    cuOccupancyMaxActiveBlocksPerMultiprocessor,
    cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags,
    cuOccupancyMaxPotentialBlockSize,
)
from .drv_stream import (  # noqa: F401 - re-exported
    cuCtxGetStreamPriorityRange,
    cuEventCreate,
    cuEventDestroy,
    cuEventElapsedTime,
    cuEventQuery,
    cuEventRecord,
    cuEventSynchronize,
    cuLaunchHostFunc,
    cuStreamAddCallback,
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy,
    cuStreamGetCtx,
    cuStreamGetDevice,
    cuStreamGetFlags,
    cuStreamGetPriority,
    cuStreamQuery,
    cuStreamSynchronize,
    cuStreamWaitEvent,
    event_destroy,
    event_elapsed,
    event_query,
    event_record,
    new_event,
    new_stream,
    run_host_function,
    stream_destroy,
    stream_entry,
    stream_query,
    stream_sync,
    stream_wait_event,
)

real: Any = None          # the real cuda.bindings.driver, set by bind()

# The families that look up types and enums in the real module (drv_copy needs none).
_USES_REAL = (drv_device, drv_memory, drv_module, drv_stream, drv_local)


def bind(real_driver: Any) -> None:
    """Give this module and every family the real cuda.bindings.driver (its types, enums and
    CUDA_VERSION): the injector calls it before the brokered module is built."""
    global real
    real = real_driver
    for family in _USES_REAL:
        family.real = real_driver
