"""Brokered implementations of cuda.bindings.driver calls.

Each function has the real one's name and parameters and returns the outputs after the
result code (the module builder adds the CUresult and turns failures into codes). Handle
types are cuda-python's own (CUdeviceptr, CUcontext, CUstream...)."""
from __future__ import annotations

import ctypes
from typing import Any

from kubecash.client import CUresult

from . import devattr, images, ops
from .errors import ERROR_NAMES, ERROR_STRINGS, ShimError, result_code, say_once
from .hostmem import as_int, host_address
from .state import STATE, Ctx, Registered, handle_int

E = CUresult
real: Any = None          # the real cuda.bindings.driver, set by the module builder


def _ctx_dev() -> tuple[Ctx, int]:
    c = STATE.ctx()
    return c, c.dev


# -- initialisation, devices --------------------------------------------------------------
def cuInit(Flags):
    if as_int(Flags, "Flags") != 0:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0")
    STATE.init()
    return ()


def cuDriverGetVersion():
    # The API version this program's cuda-bindings was built for: the brokered device
    # offers that API (the broker's own driver is not the program's business).
    return (int(real.CUDA_VERSION),)


def cuDeviceGetCount():
    STATE.need_init()
    return (len(STATE.devices),)


def cuDeviceGet(ordinal):
    return (real.CUdevice(STATE.device(ordinal)),)


def cuDeviceGetName(length, dev):
    d = STATE.dev(STATE.device(dev))
    n = as_int(length, "length")
    name = devattr.model(d).encode()[: max(0, n - 1)] + b"\0"
    return ((name + b" " * n)[:n] if n >= len(name) else name[:n],)


def cuDeviceGetAttribute(attrib, dev):
    return (devattr.attribute(real, STATE.dev(STATE.device(dev)), attrib),)


def cuDeviceTotalMem(dev):
    return (STATE.dev(STATE.device(dev)).total_memory,)   # the tenant's quota


def cuDeviceComputeCapability(dev):
    d = STATE.dev(STATE.device(dev))
    cc = d.properties.get("compute_capability") or [0, 0]
    return (int(cc[0]), int(cc[1]))


def cuDeviceGetUuid(dev):
    u = real.CUuuid()
    ctypes.memmove(u.getPtr(), devattr.uuid_bytes(STATE.dev(STATE.device(dev))), 16)
    return (u,)


def cuDeviceCanAccessPeer(dev, peerDev):
    STATE.device(dev), STATE.device(peerDev)
    return (0,)                      # devices are separate executors: no peer access


def cuDeviceGetDefaultMemPool(dev):
    i = STATE.device(dev)
    pool = STATE.pool(i)
    if not pool.handle:
        pool.handle = STATE.new_handle()
    return (real.CUmemoryPool(pool.handle),)


cuDeviceGetMemPool = cuDeviceGetDefaultMemPool


# -- contexts -----------------------------------------------------------------------------
def cuCtxCreate(*args, **kwargs):
    # CUDA 13 bindings: (ctxCreateParams, flags, dev); CUDA 12 bindings: (flags, dev).
    if len(args) + len(kwargs) == 3:
        names = ("ctxCreateParams", "flags", "dev")
    elif len(args) + len(kwargs) == 2:
        names = ("flags", "dev")
    else:
        raise TypeError("cuCtxCreate(ctxCreateParams, flags, dev)")
    given = dict(zip(names, args, strict=False), **kwargs)   # the rest may come as keywords
    if given.get("ctxCreateParams") is not None:
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "cuCtxCreate with CUctxCreateParams (execution affinity, CIG) is "
                        "not supported by the brokered device")
    i = STATE.device(given["dev"])
    c = Ctx(STATE.new_handle(), i, False, as_int(given["flags"], "flags"))
    STATE.contexts[c.handle] = c
    STATE._stack().append(c.handle)
    return (real.CUcontext(c.handle),)


def cuCtxDestroy(ctx):
    c = STATE.context(ctx)
    if c.primary:
        raise ShimError(E.CUDA_ERROR_INVALID_CONTEXT, "a primary context is released, not destroyed")
    STATE.destroy_resources(c.handle)
    c.alive = False
    STATE.contexts.pop(c.handle, None)
    return ()


def cuCtxSetCurrent(ctx):
    STATE.need_init()
    h = handle_int(ctx)
    STATE.set_current(None if h == 0 else STATE.context(h))
    return ()


def cuCtxGetCurrent():
    STATE.need_init()
    c = STATE.current()
    return (real.CUcontext(c.handle if c else 0),)


def cuCtxPushCurrent(ctx):
    c = STATE.context(ctx)
    STATE._stack().append(c.handle)
    return ()


def cuCtxPopCurrent():
    c = STATE.ctx()
    STATE._stack().pop()
    return (real.CUcontext(c.handle),)


def cuCtxGetDevice():
    return (real.CUdevice(STATE.ctx().dev),)


def cuCtxGetFlags():
    return (STATE.ctx().flags,)


def cuCtxSynchronize():
    STATE.dev(STATE.ctx().dev).synchronize()
    return ()


def cuDevicePrimaryCtxRetain(dev):
    i = STATE.device(dev)
    c = STATE.primary_ctx(i)
    c.alive = True
    STATE.primary_refs[i] = STATE.primary_refs.get(i, 0) + 1
    return (real.CUcontext(c.handle),)


def cuDevicePrimaryCtxRelease(dev):
    i = STATE.device(dev)
    if STATE.primary_refs.get(i, 0) <= 0:
        raise ShimError(E.CUDA_ERROR_INVALID_CONTEXT, "the primary context is not retained")
    STATE.primary_refs[i] -= 1
    return ()


def cuDevicePrimaryCtxReset(dev):
    i = STATE.device(dev)
    c = STATE.primary.get(i)
    if c is not None:
        STATE.dev(i).synchronize()
        STATE.destroy_resources(c.handle)
    return ()


def cuDevicePrimaryCtxGetState(dev):
    i = STATE.device(dev)
    return (STATE.device_flags.get(i, 0), int(i in STATE.primary and STATE.primary_refs.get(i, 0) > 0))


def cuDevicePrimaryCtxSetFlags(dev, flags):
    STATE.device_flags[STATE.device(dev)] = as_int(flags, "flags")
    return ()


# -- memory -----------------------------------------------------------------------------
def cuMemAlloc(bytesize):
    c, dev = _ctx_dev()
    return (real.CUdeviceptr(STATE.alloc(dev, as_int(bytesize, "bytesize"), c.handle)),)


def cuMemFree(dptr):
    STATE.ctx()
    STATE.free(dptr)
    return ()


def cuMemGetInfo():
    free, total = STATE.dev(STATE.ctx().dev).mem_info()    # the tenant's quota, not the card
    return (free, total)


def cuMemGetAddressRange(dptr):
    STATE.ctx()
    p = handle_int(dptr)
    hit = STATE.alloc_containing(p)
    if hit is not None:
        return (real.CUdeviceptr(hit[0]), hit[1].size)
    pin = STATE.pinned_by_exec(p)
    if pin is not None:
        return (real.CUdeviceptr(pin.buf.ptr), pin.size)
    raise ShimError(E.CUDA_ERROR_NOT_FOUND, f"{p:#x} is not in any allocation")


def cuMemAllocHost(bytesize):
    c, dev = _ctx_dev()
    return (STATE.alloc_pinned(dev, as_int(bytesize, "bytesize"), c.handle),)


def cuMemHostAlloc(bytesize, Flags):
    c, dev = _ctx_dev()
    return (STATE.alloc_pinned(dev, as_int(bytesize, "bytesize"), c.handle, as_int(Flags, "Flags")),)


def cuMemFreeHost(p):
    addr, _ = host_address(p, "p")
    STATE.free_pinned(addr)
    return ()


def device_pointer_of_host(p) -> int:
    addr, _ = host_address(p, "host pointer")
    pin = STATE.pinned_at(addr)
    if pin is not None:
        return pin.buf.ptr + (addr - pin.local)
    if STATE.registered_at(addr) is not None:
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "memory registered with cuMemHostRegister/cudaHostRegister stays in this "
                        "process, which the brokered device cannot map; allocate it with "
                        "cuMemHostAlloc/cudaHostAlloc (mapped) for zero-copy access")
    raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"{addr:#x} is not mapped host memory")


def cuMemHostGetDevicePointer(p, Flags):
    STATE.ctx()
    if as_int(Flags, "Flags") != 0:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "Flags must be 0")
    return (real.CUdeviceptr(device_pointer_of_host(p)),)


def cuMemHostGetFlags(p):
    addr, _ = host_address(p, "p")
    pin = STATE.pinned_at(addr)
    if pin is None:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"{addr:#x} is not pinned host memory")
    return (pin.flags | 0x02,)       # every pinned allocation is device-mapped


def host_register(p, bytesize, Flags) -> None:
    # Bookkeeping only: the memory stays in this process. Copies from and to it are staged
    # through the executor as for any pageable memory (same results); zero-copy device
    # access to it is refused by cuMemHostGetDevicePointer.
    addr, known = host_address(p, "p")
    n = as_int(bytesize, "bytesize")
    if addr == 0 or n <= 0 or (known is not None and known < n):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "invalid host range to register")
    if STATE.registered_at(addr) is not None or STATE.pinned_at(addr) is not None:
        raise ShimError(712, "host memory is already registered")   # HOST_MEMORY_ALREADY_REGISTERED
    STATE.registered[addr] = Registered(addr, n, as_int(Flags, "Flags"))


def host_unregister(p) -> None:
    addr, _ = host_address(p, "p")
    if STATE.registered.pop(addr, None) is None:
        raise ShimError(713, "host memory is not registered")        # HOST_MEMORY_NOT_REGISTERED


def cuMemHostRegister(p, bytesize, Flags):
    STATE.ctx()
    host_register(p, bytesize, Flags)
    return ()


def cuMemHostUnregister(p):
    STATE.ctx()
    host_unregister(p)
    return ()


def cuMemcpyHtoD(dstDevice, srcHost, ByteCount):
    ops.htod(dstDevice, srcHost, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoH(dstHost, srcDevice, ByteCount):
    ops.dtoh(dstHost, srcDevice, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoD(dstDevice, srcDevice, ByteCount):
    ops.dtod(dstDevice, srcDevice, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyHtoDAsync(dstDevice, srcHost, ByteCount, hStream):
    ops.htod(dstDevice, srcHost, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoHAsync(dstHost, srcDevice, ByteCount, hStream):
    ops.dtoh(dstHost, srcDevice, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyDtoDAsync(dstDevice, srcDevice, ByteCount, hStream):
    ops.dtod(dstDevice, srcDevice, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpy(dst, src, ByteCount):
    ops.copy_any(dst, src, ByteCount, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemcpyAsync(dst, src, ByteCount, hStream):
    ops.copy_any(dst, src, ByteCount, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD8(dstDevice, uc, N):
    ops.memset(dstDevice, uc, 1, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD16(dstDevice, us, N):
    ops.memset(dstDevice, us, 2, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD32(dstDevice, ui, N):
    ops.memset(dstDevice, ui, 4, N, None, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD8Async(dstDevice, uc, N, hStream):
    ops.memset(dstDevice, uc, 1, N, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD16Async(dstDevice, us, N, hStream):
    ops.memset(dstDevice, us, 2, N, hStream, default_dev=STATE.ctx().dev)
    return ()


def cuMemsetD32Async(dstDevice, ui, N, hStream):
    ops.memset(dstDevice, ui, 4, N, hStream, default_dev=STATE.ctx().dev)
    return ()


# -- stream-ordered allocation ------------------------------------------------------------
# The executor allocates at once (memory available earlier than the stream needs it is a
# valid schedule) and frees after the work queued before the free: stream order holds.
def cuMemAllocAsync(bytesize, hStream):
    c, dev = _ctx_dev()
    dev, _ = STATE.stream(hStream, dev)
    return (real.CUdeviceptr(STATE.alloc(dev, as_int(bytesize, "bytesize"), c.handle, pooled=True)),)


def cuMemAllocFromPoolAsync(bytesize, pool, hStream):
    c, dev = _ctx_dev()
    pdev = _pool_dev(pool)
    return (real.CUdeviceptr(STATE.alloc(pdev, as_int(bytesize, "bytesize"), c.handle, pooled=True)),)


def cuMemFreeAsync(dptr, hStream):
    STATE.ctx()
    STATE.stream(hStream, 0)
    STATE.free(dptr)
    return ()


def _pool_dev(pool) -> int:
    h = handle_int(pool)
    for dev, p in STATE.pools.items():
        if h and p.handle == h:
            return dev
    raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"memory pool {h:#x} is not valid")


_POOL_U64 = {"RELEASE_THRESHOLD", "RESERVED_MEM_CURRENT", "RESERVED_MEM_HIGH",
             "USED_MEM_CURRENT", "USED_MEM_HIGH"}
_POOL_BOOL = {"REUSE_FOLLOW_EVENT_DEPENDENCIES", "REUSE_ALLOW_OPPORTUNISTIC",
              "REUSE_ALLOW_INTERNAL_DEPENDENCIES"}


def _pool_attr_name(attr) -> str:
    try:
        return real.CUmemPool_attribute(int(attr)).name[len("CU_MEMPOOL_ATTR_"):]
    except (ValueError, TypeError):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"unknown memory pool attribute {attr!r}") from None


def pool_get(pool, attr):
    p = STATE.pool(_pool_dev(pool))
    name = _pool_attr_name(attr)
    if name in ("RESERVED_MEM_CURRENT", "USED_MEM_CURRENT"):
        v = p.used                 # nothing is cached: what is reserved is what is in use
    elif name in ("RESERVED_MEM_HIGH", "USED_MEM_HIGH"):
        v = p.used_high
    elif name == "RELEASE_THRESHOLD":
        v = p.attrs.get(name, 0)
    elif name in _POOL_BOOL:
        return int(p.attrs.get(name, 1))
    else:
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED, f"memory pool attribute {name} is not supported")
    return v


def pool_set(pool, attr, value) -> None:
    p = STATE.pool(_pool_dev(pool))
    name = _pool_attr_name(attr)
    v = as_int(value, "value")
    if name in ("RESERVED_MEM_HIGH", "USED_MEM_HIGH"):
        if v != 0:
            raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"{name} can only be reset to 0")
        p.used_high = p.used
    elif name == "RELEASE_THRESHOLD" or name in _POOL_BOOL:
        # A hint about caching freed memory; the executor returns memory to the quota at
        # once, which no program can tell apart except by having more memory available.
        p.attrs[name] = v
    else:
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED, f"memory pool attribute {name} is not supported")


def cuMemPoolGetAttribute(pool, attr):
    v = pool_get(pool, attr)
    name = _pool_attr_name(attr)
    return (real.cuuint64_t(v) if name in _POOL_U64 else v,)


def cuMemPoolSetAttribute(pool, attr, value):
    pool_set(pool, attr, value)
    return ()


def cuMemPoolTrimTo(pool, minBytesToKeep):
    _pool_dev(pool)
    return ()                      # nothing is cached to trim


# -- modules and launches -------------------------------------------------------------------
def _load(data: bytes) -> tuple:
    c, dev = _ctx_dev()
    return (real.CUmodule(ops.load_module(data, c.handle, dev)),)


def cuModuleLoadData(image):
    STATE.ctx()
    return _load(images.image_bytes(image))


def cuModuleLoadDataEx(image, numOptions, options, optionValues):
    STATE.ctx()
    if as_int(numOptions, "numOptions"):
        say_once("jit-options", "cuModuleLoadDataEx: JIT options are ignored on the brokered "
                 "device (the module's source is compiled for it)")
    return _load(images.image_bytes(image))


def cuModuleLoadFatBinary(fatCubin):
    STATE.ctx()
    return _load(images.image_bytes(fatCubin))


def cuModuleLoad(fname):
    STATE.ctx()
    return _load(images.read_image_file(fname))


def cuModuleUnload(hmod):
    STATE.drop_module(handle_int(hmod))
    return ()


def cuModuleGetFunction(hmod, name):
    return (real.CUfunction(ops.get_function(hmod, name)),)


def cuModuleGetGlobal(hmod, name):
    m = STATE.module(hmod)
    nm = name.decode() if isinstance(name, (bytes, bytearray)) else str(name)
    ptr, size = m.module.get_global(nm.rstrip("\0"))
    return (real.CUdeviceptr(ptr), size)


def cuFuncSetCacheConfig(hfunc, config):
    STATE.function(hfunc)
    return ()                      # a cache preference: a hint, nothing to do on a CPU


def cuFuncSetAttribute(hfunc, attrib, value):
    STATE.function(hfunc)
    name = real.CUfunction_attribute(int(attrib)).name
    if name in ("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES",
                "CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT"):
        return ()                  # the executor checks each launch's shared memory itself
    raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED, f"function attribute {name} cannot be set")


def cuLaunchKernel(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                   sharedMemBytes, hStream, kernelParams, extra):
    STATE.ctx()
    ops.launch(f, (gridDimX, gridDimY, gridDimZ), (blockDimX, blockDimY, blockDimZ),
               sharedMemBytes, hStream, kernelParams, extra)
    return ()


# -- streams and events ---------------------------------------------------------------------
def new_stream(dev: int, ctx: int, flags: int) -> int:
    st = STATE.dev(dev).create_stream(flags)
    h = STATE.new_handle()
    STATE.streams[h] = (dev, st, ctx)
    STATE.stream_flags[h] = flags
    return h


def cuStreamCreate(Flags):
    c, dev = _ctx_dev()
    return (real.CUstream(new_stream(dev, c.handle, as_int(Flags, "Flags"))),)


def cuStreamCreateWithPriority(flags, priority):
    c, dev = _ctx_dev()
    return (real.CUstream(new_stream(dev, c.handle, as_int(flags, "flags"))),)


def stream_destroy(hStream) -> None:
    h = handle_int(hStream)
    if h in (0, 1, 2) or h not in STATE.streams:
        raise ShimError(E.CUDA_ERROR_INVALID_HANDLE, f"stream {h:#x} is not valid")
    _, st, _ = STATE.streams.pop(h)
    STATE.stream_flags.pop(h, None)
    st.close()


def stream_sync(hStream, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    STATE.dev(dev).request("stream_sync", stream=0 if st is None else st.handle)


def stream_query(hStream, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    if not STATE.dev(dev).request("stream_query", stream=0 if st is None else st.handle)["ready"]:
        raise ShimError(E.CUDA_ERROR_NOT_READY, "")


def stream_wait_event(hStream, hEvent, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    edev, ev = STATE.event(hEvent)
    if edev != dev:
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED, "waiting on another device's event")
    STATE.dev(dev).submit("stream_wait_event", stream=0 if st is None else st.handle, event=ev.handle)


def cuStreamDestroy(hStream):
    STATE.ctx()
    stream_destroy(hStream)
    return ()


def cuStreamSynchronize(hStream):
    stream_sync(hStream, STATE.ctx().dev)
    return ()


def cuStreamQuery(hStream):
    stream_query(hStream, STATE.ctx().dev)
    return ()


def cuStreamWaitEvent(hStream, hEvent, Flags):
    stream_wait_event(hStream, hEvent, STATE.ctx().dev)
    return ()


def new_event(dev: int, ctx: int, flags: int) -> int:
    ev = STATE.dev(dev).create_event(flags)
    h = STATE.new_handle()
    STATE.events[h] = (dev, ev, ctx)
    return h


def event_record(hEvent, hStream) -> None:
    dev, ev = STATE.event(hEvent)
    sdev, st = STATE.stream(hStream, dev)
    if sdev != dev:
        raise ShimError(E.CUDA_ERROR_INVALID_HANDLE, "event and stream belong to different devices")
    ev.record(st)


def event_query(hEvent) -> None:
    _, ev = STATE.event(hEvent)
    if not ev.query():
        raise ShimError(E.CUDA_ERROR_NOT_READY, "")


def event_elapsed(hStart, hEnd) -> float:
    _, a = STATE.event(hStart)
    _, b = STATE.event(hEnd)
    return float(b.elapsed_ms(a))


def event_destroy(hEvent) -> None:
    h = handle_int(hEvent)
    entry = STATE.events.pop(h, None)
    if entry is None:
        raise ShimError(E.CUDA_ERROR_INVALID_HANDLE, f"event {h:#x} is not valid")
    entry[1].close()


def cuEventCreate(Flags):
    c, dev = _ctx_dev()
    return (real.CUevent(new_event(dev, c.handle, as_int(Flags, "Flags"))),)


def cuEventRecord(hEvent, hStream):
    STATE.ctx()
    event_record(hEvent, hStream)
    return ()


def cuEventSynchronize(hEvent):
    STATE.ctx()
    STATE.event(hEvent)[1].synchronize()
    return ()


def cuEventQuery(hEvent):
    STATE.ctx()
    event_query(hEvent)
    return ()


def cuEventElapsedTime(hStart, hEnd):
    STATE.ctx()
    return (event_elapsed(hStart, hEnd),)


def cuEventDestroy(hEvent):
    STATE.ctx()
    event_destroy(hEvent)
    return ()


# -- pointer attributes (from the shim's own tables) ------------------------------------------
def pointer_info(p: int) -> dict | None:
    """What the program's allocations say about address `p`: None when it is in none."""
    hit = STATE.alloc_containing(p)
    if hit is not None:
        base, a = hit
        pool = STATE.pools.get(a.dev)
        return {"type": "device", "dev": a.dev, "ctx": a.ctx, "base": base, "size": a.size,
                "device_ptr": p, "host_ptr": None, "mapped": False, "buffer_id": a.buffer_id,
                "pool": pool.handle if (a.pooled and pool is not None and pool.handle) else None}
    pin = STATE.pinned_by_exec(p)                 # the device address of pinned host memory
    if pin is not None:
        off = p - pin.buf.ptr
        return {"type": "host", "dev": pin.dev, "ctx": pin.ctx, "base": pin.buf.ptr,
                "size": pin.size, "device_ptr": p, "host_ptr": pin.local + off, "mapped": True,
                "buffer_id": pin.local, "pool": None}
    pin = STATE.pinned_at(p)
    if pin is not None:
        off = p - pin.local
        return {"type": "host", "dev": pin.dev, "ctx": pin.ctx, "base": pin.buf.ptr,
                "size": pin.size, "device_ptr": pin.buf.ptr + off, "host_ptr": p, "mapped": True,
                "buffer_id": pin.local, "pool": None}
    reg = STATE.registered_at(p)
    if reg is not None:
        return {"type": "host", "dev": STATE.ctx().dev, "ctx": STATE.ctx().handle,
                "base": reg.local, "size": reg.size, "device_ptr": "registered", "host_ptr": p,
                "mapped": False, "buffer_id": reg.local, "pool": None}
    return None


def _pointer_attribute(info: dict, attr) -> Any:
    try:
        name = real.CUpointer_attribute(int(attr)).name[len("CU_POINTER_ATTRIBUTE_"):]
    except (ValueError, TypeError):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"unknown pointer attribute {attr!r}") from None
    mt = real.CUmemorytype
    if name == "CONTEXT":
        return real.CUcontext(info["ctx"])
    if name == "MEMORY_TYPE":
        return int(mt.CU_MEMORYTYPE_DEVICE if info["type"] == "device" else mt.CU_MEMORYTYPE_HOST)
    if name == "DEVICE_ORDINAL":
        return info["dev"]
    if name == "DEVICE_POINTER":
        if info["device_ptr"] == "registered":
            device_pointer_of_host(info["host_ptr"])          # raises, saying why
        return real.CUdeviceptr(info["device_ptr"])
    if name == "HOST_POINTER":
        if info["host_ptr"] is None:
            raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "device memory has no host address")
        return info["host_ptr"]
    if name == "RANGE_START_ADDR":
        return real.CUdeviceptr(info["base"])
    if name == "RANGE_SIZE":
        return info["size"]
    if name == "MAPPED":
        return bool(info["mapped"] or info["type"] == "device")
    if name in ("IS_MANAGED", "IS_LEGACY_CUDA_IPC_CAPABLE"):
        return False
    if name == "SYNC_MEMOPS":
        return True                  # the executor orders copies itself
    if name == "BUFFER_ID":
        return int(info["buffer_id"])
    if name in ("ALLOWED_HANDLE_TYPES", "IS_GPU_DIRECT_RDMA_CAPABLE"):
        return 0
    if name == "ACCESS_FLAGS":
        return 3                     # CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READWRITE
    if name == "MEMPOOL_HANDLE":
        if info["pool"] is None:
            raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "the memory is not from a memory pool")
        return real.CUmemoryPool(info["pool"])
    raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED,
                    f"pointer attribute CU_POINTER_ATTRIBUTE_{name} is not supported")


def cuPointerGetAttribute(attribute, ptr):
    STATE.ctx()
    p = handle_int(ptr)
    info = pointer_info(p)
    if info is None:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"{p:#x} was not allocated, mapped or "
                        "registered through this program's brokered device")
    return (_pointer_attribute(info, attribute),)


def cuPointerGetAttributes(numAttributes, attributes, ptr):
    STATE.ctx()
    attrs = list(attributes or ())
    if as_int(numAttributes, "numAttributes") != len(attrs):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "numAttributes does not match attributes")
    info = pointer_info(handle_int(ptr))
    if info is None:
        # As the driver does for an address it does not know: "not device memory" answers.
        out = []
        for a in attrs:
            nm = real.CUpointer_attribute(int(a)).name
            out.append(real.CUcontext(0) if nm.endswith("_CONTEXT") else
                       real.CUdeviceptr(0) if nm.endswith(("DEVICE_POINTER", "RANGE_START_ADDR")) else
                       -2 if nm.endswith("DEVICE_ORDINAL") else
                       False if nm.endswith(("IS_MANAGED", "MAPPED", "SYNC_MEMOPS",
                                             "IS_LEGACY_CUDA_IPC_CAPABLE")) else 0)
        return (out,)
    return ([_pointer_attribute(info, a) for a in attrs],)


# -- function attributes and occupancy (from the device's own limits) --------------------------
def _dev_attr(dev: int, short: str) -> int:
    return devattr.attribute(real, STATE.dev(dev),
                             getattr(real.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + short))


def cuFuncGetAttribute(attrib, hfunc):
    f = STATE.function(hfunc)
    try:
        name = real.CUfunction_attribute(int(attrib)).name
    except (ValueError, TypeError):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"unknown function attribute {attrib!r}") from None
    if name == "CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK":
        return (_dev_attr(f.dev, "MAX_THREADS_PER_BLOCK"),)
    if name in ("CU_FUNC_ATTRIBUTE_PTX_VERSION", "CU_FUNC_ATTRIBUTE_BINARY_VERSION"):
        return (_dev_attr(f.dev, "COMPUTE_CAPABILITY_MAJOR") * 10
                + _dev_attr(f.dev, "COMPUTE_CAPABILITY_MINOR"),)
    raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED,
                    f"function attribute {name} is not known for a kernel on the brokered device")


def blocks_per_sm(dev: int, block_size: int, dynamic_smem: int) -> int:
    """Resident blocks per multiprocessor as the device's reported limits allow."""
    if block_size <= 0 or block_size > _dev_attr(dev, "MAX_THREADS_PER_BLOCK"):
        return 0
    if dynamic_smem > _dev_attr(dev, "MAX_SHARED_MEMORY_PER_BLOCK"):
        return 0
    n = min(_dev_attr(dev, "MAX_BLOCKS_PER_MULTIPROCESSOR"),
            _dev_attr(dev, "MAX_THREADS_PER_MULTIPROCESSOR") // block_size)
    if dynamic_smem > 0:
        n = min(n, _dev_attr(dev, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR") // dynamic_smem)
    return max(n, 0)


def cuOccupancyMaxActiveBlocksPerMultiprocessor(func, blockSize, dynamicSMemSize):
    f = STATE.function(func)
    return (blocks_per_sm(f.dev, as_int(blockSize, "blockSize"),
                          as_int(dynamicSMemSize, "dynamicSMemSize")),)


def cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(func, blockSize, dynamicSMemSize, flags):
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(func, blockSize, dynamicSMemSize)


def cuOccupancyMaxPotentialBlockSize(func, blockSizeToDynamicSMemSize, dynamicSMemSize,
                                     blockSizeLimit):
    f = STATE.function(func)
    if blockSizeToDynamicSMemSize not in (None, 0) and handle_int(blockSizeToDynamicSMemSize):
        raise ShimError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "cuOccupancyMaxPotentialBlockSize with a blockSizeToDynamicSMemSize "
                        "callback is not supported; pass None and dynamicSMemSize")
    smem = as_int(dynamicSMemSize, "dynamicSMemSize")
    limit = as_int(blockSizeLimit, "blockSizeLimit")
    warp = _dev_attr(f.dev, "WARP_SIZE")
    top = _dev_attr(f.dev, "MAX_THREADS_PER_BLOCK")
    if limit > 0:
        top = min(top, limit)
    best, best_threads = 0, -1
    for bs in range(top, 0, -1):             # the largest block size of the best occupancy
        if bs % warp and bs != top:
            continue
        threads = blocks_per_sm(f.dev, bs, smem) * bs
        if threads > best_threads:
            best, best_threads = bs, threads
    if best_threads <= 0:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "no block size fits the kernel's shared memory")
    return (blocks_per_sm(f.dev, best, smem) * _dev_attr(f.dev, "MULTIPROCESSOR_COUNT"), best)


# -- stream queries and host functions ------------------------------------------------------
def cuCtxGetStreamPriorityRange():
    STATE.ctx()
    return (0, 0)                    # priorities are not supported: (least, greatest) = (0, 0)


def stream_entry(hStream, dev_default: int) -> tuple[int, int, int]:
    """(device, ctx handle, flags) of a stream argument (the NULL stream: the current context's)."""
    h = handle_int(hStream)
    dev, _ = STATE.stream(hStream, dev_default)
    if h in (0, 1, 2):
        c = STATE.current()
        return dev, (c.handle if c else 0), 0
    _, _, ctx = STATE.streams[h]
    return dev, ctx, STATE.stream_flags.get(h, 0)


def cuStreamGetFlags(hStream):
    return (stream_entry(hStream, STATE.ctx().dev)[2],)


def cuStreamGetPriority(hStream):
    stream_entry(hStream, STATE.ctx().dev)
    return (0,)


def cuStreamGetCtx(hStream):
    return (real.CUcontext(stream_entry(hStream, STATE.ctx().dev)[1]),)


def cuStreamGetDevice(hStream):
    return (real.CUdevice(stream_entry(hStream, STATE.ctx().dev)[0]),)


_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_STREAM_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


def _user_data(userData) -> int:
    if userData is None:
        return 0
    addr, _ = host_address(userData, "userData")
    return addr


def run_host_function(hStream, fn, userData, dev_default: int, callback: bool) -> None:
    """cuLaunchHostFunc / cuStreamAddCallback: the function runs once the work queued before it
    on the stream is done, and the work queued after it starts after it returned. The shim
    waits for the stream and calls the function in the calling thread (the brokered device
    cannot call into this process), which keeps both orders; the call itself blocks."""
    if fn is None or (not callable(fn) and handle_int(fn) == 0):
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "the host function is NULL")
    stream_sync(hStream, dev_default)
    data = _user_data(userData)
    if callable(fn) and not hasattr(fn, "getPtr"):
        if isinstance(fn, ctypes._CFuncPtr):
            fn(handle_int(hStream), 0, data) if callback else fn(data)
        else:                        # a plain Python callable
            fn(hStream, E.CUDA_SUCCESS, userData) if callback else fn(userData)
        return
    addr = handle_int(fn)
    if callback:
        _STREAM_CB(addr)(handle_int(hStream), 0, data)
    else:
        _HOST_FN(addr)(data)


def cuLaunchHostFunc(hStream, fn, userData):
    run_host_function(hStream, fn, userData, STATE.ctx().dev, callback=False)
    return ()


def cuStreamAddCallback(hStream, callback, userData, flags):
    if as_int(flags, "flags") != 0:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
    run_host_function(hStream, callback, userData, STATE.ctx().dev, callback=True)
    return ()


def cuProfilerStart():
    STATE.ctx()
    return ()                        # no profiler is attached to a brokered device: a no-op


def cuProfilerStop():
    STATE.ctx()
    return ()


# -- errors (answered locally) -----------------------------------------------------------------


def cuGetErrorName(error):
    code = result_code(error)
    try:
        return (real.CUresult(code).name.encode(),)
    except ValueError:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}") from None


def cuGetErrorString(error):
    code = result_code(error)
    try:
        name = real.CUresult(code).name
    except ValueError:
        raise ShimError(E.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}") from None
    return (ERROR_STRINGS.get(code, ERROR_NAMES.get(code, name)).encode(),)
