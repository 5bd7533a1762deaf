"""Brokered cuda.bindings.driver calls, memory: device allocations, pinned (mapped) and
registered host memory, stream-ordered allocation and memory pools, pointer attributes."""
from __future__ import annotations

from typing import Any

from kubecash.client.errors import CudaError, E

from .drv_device import ctx_dev
from .hostmem import as_int, host_address
from .state import STATE, Registered, handle_int

real: Any = None          # the real cuda.bindings.driver, set by driver.bind()


# -- memory -----------------------------------------------------------------------------
def cuMemAlloc(bytesize):
    c, dev = ctx_dev()
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
    raise CudaError(E.CUDA_ERROR_NOT_FOUND, f"{p:#x} is not in any allocation")


def cuMemAllocHost(bytesize):
    c, dev = ctx_dev()
    return (STATE.alloc_pinned(dev, as_int(bytesize, "bytesize"), c.handle),)


def cuMemHostAlloc(bytesize, Flags):
    c, dev = ctx_dev()
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
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "memory registered with cuMemHostRegister/cudaHostRegister stays in this "
                        "process, which the brokered device cannot map; allocate it with "
                        "cuMemHostAlloc/cudaHostAlloc (mapped) for zero-copy access")
    raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{addr:#x} is not mapped host memory")


def cuMemHostGetDevicePointer(p, Flags):
    STATE.ctx()
    if as_int(Flags, "Flags") != 0:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "Flags must be 0")
    return (real.CUdeviceptr(device_pointer_of_host(p)),)


def cuMemHostGetFlags(p):
    addr, _ = host_address(p, "p")
    pin = STATE.pinned_at(addr)
    if pin is None:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{addr:#x} is not pinned host memory")
    return (pin.flags | 0x02,)       # every pinned allocation is device-mapped


def host_register(p, bytesize, Flags) -> None:
    # Bookkeeping only: the memory stays in this process. Copies from and to it are staged
    # through the executor as for any pageable memory (same results); zero-copy device
    # access to it is refused by cuMemHostGetDevicePointer.
    addr, known = host_address(p, "p")
    n = as_int(bytesize, "bytesize")
    if addr == 0 or n <= 0 or (known is not None and known < n):
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "invalid host range to register")
    if STATE.registered_at(addr) is not None or STATE.pinned_at(addr) is not None:
        raise CudaError(712, "host memory is already registered")   # HOST_MEMORY_ALREADY_REGISTERED
    STATE.registered[addr] = Registered(addr, n, as_int(Flags, "Flags"))


def host_unregister(p) -> None:
    addr, _ = host_address(p, "p")
    if STATE.registered.pop(addr, None) is None:
        raise CudaError(713, "host memory is not registered")        # HOST_MEMORY_NOT_REGISTERED


def cuMemHostRegister(p, bytesize, Flags):
    STATE.ctx()
    host_register(p, bytesize, Flags)
    return ()


def cuMemHostUnregister(p):
    STATE.ctx()
    host_unregister(p)
    return ()


# -- stream-ordered allocation ------------------------------------------------------------
# The executor allocates at once (memory available earlier than the stream needs it is a
# valid schedule) and frees after the work queued before the free: stream order holds.
def cuMemAllocAsync(bytesize, hStream):
    c, dev = ctx_dev()
    dev, _ = STATE.stream(hStream, dev)
    return (real.CUdeviceptr(STATE.alloc(dev, as_int(bytesize, "bytesize"), c.handle, pooled=True)),)


def cuMemAllocFromPoolAsync(bytesize, pool, hStream):
    c, dev = ctx_dev()
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
    raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"memory pool {h:#x} is not valid")


_POOL_U64 = {"RELEASE_THRESHOLD", "RESERVED_MEM_CURRENT", "RESERVED_MEM_HIGH",
             "USED_MEM_CURRENT", "USED_MEM_HIGH"}
_POOL_BOOL = {"REUSE_FOLLOW_EVENT_DEPENDENCIES", "REUSE_ALLOW_OPPORTUNISTIC",
              "REUSE_ALLOW_INTERNAL_DEPENDENCIES"}


def _pool_attr_name(attr) -> str:
    try:
        return real.CUmemPool_attribute(int(attr)).name[len("CU_MEMPOOL_ATTR_"):]
    except (ValueError, TypeError):
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"unknown memory pool attribute {attr!r}") from None


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
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED, f"memory pool attribute {name} is not supported")
    return v


def pool_set(pool, attr, value) -> None:
    p = STATE.pool(_pool_dev(pool))
    name = _pool_attr_name(attr)
    v = as_int(value, "value")
    if name in ("RESERVED_MEM_HIGH", "USED_MEM_HIGH"):
        if v != 0:
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{name} can only be reset to 0")
        p.used_high = p.used
    elif name == "RELEASE_THRESHOLD" or name in _POOL_BOOL:
        # A hint about caching freed memory; the executor returns memory to the quota at
        # once, which no program can tell apart except by having more memory available.
        p.attrs[name] = v
    else:
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED, f"memory pool attribute {name} is not supported")


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
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"unknown pointer attribute {attr!r}") from None
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
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "device memory has no host address")
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
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "the memory is not from a memory pool")
        return real.CUmemoryPool(info["pool"])
    raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
                    f"pointer attribute CU_POINTER_ATTRIBUTE_{name} is not supported")


def cuPointerGetAttribute(attribute, ptr):
    STATE.ctx()
    p = handle_int(ptr)
    info = pointer_info(p)
    if info is None:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{p:#x} was not allocated, mapped or "
                        "registered through this program's brokered device")
    return (_pointer_attribute(info, attribute),)


def cuPointerGetAttributes(numAttributes, attributes, ptr):
    STATE.ctx()
    attrs = list(attributes or ())
    if as_int(numAttributes, "numAttributes") != len(attrs):
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "numAttributes does not match attributes")
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
