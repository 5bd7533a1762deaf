"""Brokered cuda.bindings.driver calls, initialisation and devices: cuInit, the device
queries (answered from what the broker reports of the tenant's device), contexts and primary
contexts (kept in the shim's own tables), and ctx_dev(), which the other families share."""
from __future__ import annotations

import ctypes
from typing import Any

from kubecash.client.errors import CudaError, E

from . import devattr
from .hostmem import as_int
from .state import STATE, Ctx, handle_int

real: Any = None          # the real cuda.bindings.driver, set by driver.bind()


def ctx_dev() -> tuple[Ctx, int]:
    """The current context and its device (STATE.ctx() raises when there is none)."""
    c = STATE.ctx()
    return c, c.dev


# -- initialisation, devices --------------------------------------------------------------
def cuInit(Flags):
    if as_int(Flags, "Flags") != 0:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0")
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
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
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
        raise CudaError(E.CUDA_ERROR_INVALID_CONTEXT, "a primary context is released, not destroyed")
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
        raise CudaError(E.CUDA_ERROR_INVALID_CONTEXT, "the primary context is not retained")
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
