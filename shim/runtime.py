"""Brokered implementations of cuda.bindings.runtime calls.

The runtime API initialises itself on first use and works in the current device's primary
context, as cudart does; its calls map onto the same operations as the driver's."""
from __future__ import annotations

import ctypes
from typing import Any

from kubecash.client.errors import CudaError, E

from . import devattr, driver, ops
from .errors import ERROR_STRINGS, result_code
from .hostmem import as_int, host_address
from .state import STATE

real: Any = None          # the real cuda.bindings.runtime, set by the module builder
real_driver: Any = None


def _ctx():
    return STATE.runtime_ctx()


def _dev() -> int:
    return _ctx().dev


# -- devices -------------------------------------------------------------------------------
def cudaGetDeviceCount():
    STATE.init()
    return (len(STATE.devices),)


def cudaSetDevice(device):
    STATE.init()
    i = STATE.device(device)
    STATE.tls.runtime_device = i
    STATE.set_current(STATE.primary_ctx(i))     # cudart makes the primary context current
    return ()


def cudaGetDevice():
    return (_dev(),)


def cudaInitDevice(device, deviceFlags, flags):
    STATE.init()
    STATE.primary_ctx(STATE.device(device))
    return ()


def cudaSetDeviceFlags(flags):
    dev = _dev()
    STATE.device_flags[dev] = as_int(flags, "flags")   # mapped host memory is always on
    return ()


def cudaGetDeviceFlags():
    return (STATE.device_flags.get(_dev(), 0),)


def cudaDeviceGetAttribute(attr, device):
    STATE.init()
    return (devattr.attribute(real_driver, STATE.dev(STATE.device(device)), attr),)


def cudaGetDeviceProperties(device):
    STATE.init()
    d = STATE.dev(STATE.device(device))
    p = real.cudaDeviceProp()
    name = devattr.model(d).encode()[:255]
    p.name = name + b"\0" * (256 - len(name))
    ctypes.memmove(p.uuid.getPtr(), devattr.uuid_bytes(d), 16)
    p.totalGlobalMem = d.total_memory                    # the tenant's quota
    cc = d.properties.get("compute_capability") or [0, 0]
    p.major, p.minor = int(cc[0]), int(cc[1])
    fields = {
        "multiProcessorCount": "MULTIPROCESSOR_COUNT", "maxThreadsPerBlock": "MAX_THREADS_PER_BLOCK",
        "sharedMemPerBlock": "MAX_SHARED_MEMORY_PER_BLOCK", "sharedMemPerBlockOptin":
        "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN", "sharedMemPerMultiprocessor":
        "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", "warpSize": "WARP_SIZE",
        "canMapHostMemory": "CAN_MAP_HOST_MEMORY", "unifiedAddressing": "UNIFIED_ADDRESSING",
        "memoryPoolsSupported": "MEMORY_POOLS_SUPPORTED", "concurrentKernels": "CONCURRENT_KERNELS",
        "asyncEngineCount": "ASYNC_ENGINE_COUNT", "integrated": "INTEGRATED",
        "managedMemory": "MANAGED_MEMORY", "totalConstMem": "TOTAL_CONSTANT_MEMORY",
        "regsPerBlock": "MAX_REGISTERS_PER_BLOCK", "maxThreadsPerMultiProcessor":
        "MAX_THREADS_PER_MULTIPROCESSOR", "hostRegisterSupported": "HOST_REGISTER_SUPPORTED",
        "canUseHostPointerForRegisteredMem": "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM",
        "cooperativeLaunch": "COOPERATIVE_LAUNCH", "pageableMemoryAccess": "PAGEABLE_MEMORY_ACCESS",
        "concurrentManagedAccess": "CONCURRENT_MANAGED_ACCESS", "ECCEnabled": "ECC_ENABLED",
        "l2CacheSize": "L2_CACHE_SIZE", "memPitch": "MAX_PITCH",
    }
    for field, attr in fields.items():
        try:
            v = devattr.attribute(real_driver, d, getattr(real_driver.CUdevice_attribute,
                "CU_DEVICE_ATTRIBUTE_" + attr))
        except CudaError:
            continue                      # not known for this device: left 0
        try:
            setattr(p, field, v)
        except (AttributeError, TypeError, OverflowError):
            pass
    for field, key in (("maxThreadsDim", "max_block_dim"), ("maxGridSize", "max_grid_dim")):
        if d.properties.get(key):
            setattr(p, field, [int(x) for x in d.properties[key]])
    return (p,)


def cudaDeviceSynchronize():
    STATE.dev(_dev()).synchronize()
    return ()


def cudaDeviceReset():
    c = _ctx()
    STATE.dev(c.dev).synchronize()
    STATE.destroy_resources(STATE.primary_ctx(c.dev).handle)
    return ()


def cudaDeviceCanAccessPeer(device, peerDevice):
    STATE.init()
    STATE.device(device), STATE.device(peerDevice)
    return (0,)


def cudaDriverGetVersion():
    return (int(real_driver.CUDA_VERSION),)


def cudaRuntimeGetVersion():
    return (int(real.CUDART_VERSION),)


# -- memory ---------------------------------------------------------------------------------
def cudaMalloc(size):
    c = _ctx()
    return (STATE.alloc(c.dev, as_int(size, "size"), c.handle),)


def cudaFree(devPtr):
    _ctx()                          # cudaFree(0) is the classic way to initialise the runtime
    STATE.free(devPtr)
    return ()


def cudaMemGetInfo():
    return STATE.dev(_dev()).mem_info()


def cudaMallocHost(size):
    c = _ctx()
    return (STATE.alloc_pinned(c.dev, as_int(size, "size"), c.handle),)


def cudaHostAlloc(size, flags):
    c = _ctx()
    return (STATE.alloc_pinned(c.dev, as_int(size, "size"), c.handle, as_int(flags, "flags")),)


def cudaFreeHost(ptr):
    _ctx()
    addr, _ = host_address(ptr, "ptr")
    STATE.free_pinned(addr)
    return ()


def cudaHostGetDevicePointer(pHost, flags):
    _ctx()
    if as_int(flags, "flags") != 0:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
    return (driver.device_pointer_of_host(pHost),)


def cudaHostGetFlags(pHost):
    _ctx()
    return driver.cuMemHostGetFlags(pHost)


def cudaHostRegister(ptr, size, flags):
    _ctx()
    driver.host_register(ptr, size, flags)
    return ()


def cudaHostUnregister(ptr):
    _ctx()
    driver.host_unregister(ptr)
    return ()


_H2H, _H2D, _D2H, _D2D, _DEFAULT = 0, 1, 2, 3, 4


def _copy(dst, src, count, kind, stream) -> None:
    k = as_int(kind, "kind")
    dev = _dev()
    fn = {_H2H: ops.htoh, _H2D: ops.htod, _D2H: ops.dtoh, _D2D: ops.dtod,
          _DEFAULT: ops.copy_any}.get(k)
    if fn is None:
        raise CudaError(21, f"invalid memcpy kind {k}")     # cudaErrorInvalidMemcpyDirection
    fn(dst, src, count, stream, default_dev=dev)


def cudaMemcpy(dst, src, count, kind):
    _copy(dst, src, count, kind, None)
    return ()


def cudaMemcpyAsync(dst, src, count, kind, stream):
    _copy(dst, src, count, kind, stream)
    return ()


def cudaMemset(devPtr, value, count):
    ops.memset(devPtr, value, 1, count, None, default_dev=_dev())
    return ()


def cudaMemsetAsync(devPtr, value, count, stream):
    ops.memset(devPtr, value, 1, count, stream, default_dev=_dev())
    return ()


def cudaMallocAsync(size, hStream):
    c = _ctx()
    dev, _ = STATE.stream(hStream, c.dev)
    return (STATE.alloc(dev, as_int(size, "size"), c.handle, pooled=True),)


def cudaMallocFromPoolAsync(size, memPool, stream):
    c = _ctx()
    return (STATE.alloc(driver._pool_dev(memPool), as_int(size, "size"), c.handle, pooled=True),)


def cudaFreeAsync(devPtr, hStream):
    _ctx()
    STATE.stream(hStream, 0)
    STATE.free(devPtr)
    return ()


def cudaDeviceGetDefaultMemPool(device):
    STATE.init()
    h = driver.cuDeviceGetDefaultMemPool(device)[0]
    return (real.cudaMemPool_t(int(h)),)


cudaDeviceGetMemPool = cudaDeviceGetDefaultMemPool


def cudaMemPoolSetAttribute(memPool, attr, value):
    driver.pool_set(memPool, attr, value)      # cudaMemPoolAttr numbers equal CUmemPool_attribute's
    return ()


def cudaMemPoolGetAttribute(memPool, attr):
    v = driver.pool_get(memPool, attr)
    name = driver._pool_attr_name(attr)
    return (real_driver.cuuint64_t(v) if name in driver._POOL_U64 else v,)


def cudaMemPoolTrimTo(memPool, minBytesToKeep):
    driver._pool_dev(memPool)
    return ()


# -- streams and events ------------------------------------------------------------------------
def cudaStreamCreate():
    c = _ctx()
    return (real.cudaStream_t(driver.new_stream(c.dev, c.handle, 0)),)


def cudaStreamCreateWithFlags(flags):
    c = _ctx()
    return (real.cudaStream_t(driver.new_stream(c.dev, c.handle, as_int(flags, "flags"))),)


def cudaStreamCreateWithPriority(flags, priority):
    c = _ctx()
    return (real.cudaStream_t(driver.new_stream(c.dev, c.handle, as_int(flags, "flags"))),)


def cudaStreamDestroy(stream):
    _ctx()
    driver.stream_destroy(stream)
    return ()


def cudaStreamSynchronize(stream):
    driver.stream_sync(stream, _dev())
    return ()


def cudaStreamQuery(stream):
    driver.stream_query(stream, _dev())
    return ()


def cudaStreamWaitEvent(stream, event, flags):
    driver.stream_wait_event(stream, event, _dev())
    return ()


def cudaEventCreate():
    c = _ctx()
    return (real.cudaEvent_t(driver.new_event(c.dev, c.handle, 0)),)


def cudaEventCreateWithFlags(flags):
    c = _ctx()
    return (real.cudaEvent_t(driver.new_event(c.dev, c.handle, as_int(flags, "flags"))),)


def cudaEventRecord(event, stream):
    _ctx()
    driver.event_record(event, stream)
    return ()


def cudaEventSynchronize(event):
    _ctx()
    STATE.event(event)[1].synchronize()
    return ()


def cudaEventQuery(event):
    _ctx()
    driver.event_query(event)
    return ()


def cudaEventElapsedTime(start, end):
    _ctx()
    return (driver.event_elapsed(start, end),)


def cudaEventDestroy(event):
    _ctx()
    driver.event_destroy(event)
    return ()


def cudaDeviceGetStreamPriorityRange():
    _ctx()
    return (0, 0)                    # priorities are not supported: (least, greatest) = (0, 0)


def cudaStreamGetFlags(hStream):
    return (driver.stream_entry(hStream, _dev())[2],)


def cudaStreamGetPriority(hStream):
    driver.stream_entry(hStream, _dev())
    return (0,)


def cudaStreamGetDevice(hStream):
    return (driver.stream_entry(hStream, _dev())[0],)


def cudaLaunchHostFunc(stream, fn, userData):
    driver.run_host_function(stream, fn, userData, _dev(), callback=False)
    return ()


def cudaStreamAddCallback(stream, callback, userData, flags):
    if as_int(flags, "flags") != 0:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
    driver.run_host_function(stream, callback, userData, _dev(), callback=True)
    return ()


def cudaPointerGetAttributes(ptr):
    _ctx()
    a = real.cudaPointerAttributes()
    try:
        p, _ = host_address(ptr, "ptr")
    except CudaError:
        p = 0
    info = driver.pointer_info(p) if p else None
    mt = real.cudaMemoryType
    if info is None:                 # CUDA 11+: unregistered host memory is an answer
        a.type, a.device, a.devicePointer, a.hostPointer = mt.cudaMemoryTypeUnregistered, -2, 0, p
        return (a,)
    a.type = mt.cudaMemoryTypeDevice if info["type"] == "device" else mt.cudaMemoryTypeHost
    a.device = info["dev"]
    dp = info["device_ptr"]
    a.devicePointer = 0 if dp == "registered" else dp
    a.hostPointer = info["host_ptr"] or 0
    return (a,)


def cudaProfilerStart():
    _ctx()
    return ()                        # no profiler is attached to a brokered device: a no-op


def cudaProfilerStop():
    _ctx()
    return ()


# -- errors (answered locally) ------------------------------------------------------------------


def cudaGetErrorName(error):
    try:
        return (real.cudaError_t(result_code(error)).name.encode(),)
    except ValueError:
        return (b"cudaErrorUnknown",)


def cudaGetErrorString(error):
    code = result_code(error)
    try:
        name = real.cudaError_t(code).name
    except ValueError:
        return (b"unknown error",)
    return (ERROR_STRINGS.get(code, name).encode(),)


def cudaGetLastError():
    return ()          # handled by the module builder, which keeps the last error


def cudaPeekAtLastError():
    return ()
