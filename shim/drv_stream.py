"""Brokered cuda.bindings.driver calls, ordering: streams, events, stream queries and host
functions (cuLaunchHostFunc, cuStreamAddCallback)."""
from __future__ import annotations

import ctypes
from typing import Any

from kubecash.client.errors import CudaError, E

from .drv_device import ctx_dev
from .hostmem import as_int, host_address
from .state import STATE, handle_int

real: Any = None          # the real cuda.bindings.driver, set by driver.bind()


# -- streams and events ---------------------------------------------------------------------
def new_stream(dev: int, ctx: int, flags: int) -> int:
    st = STATE.dev(dev).create_stream(flags)
    h = STATE.new_handle()
    STATE.streams[h] = (dev, st, ctx)
    STATE.stream_flags[h] = flags
    return h


def cuStreamCreate(Flags):
    c, dev = ctx_dev()
    return (real.CUstream(new_stream(dev, c.handle, as_int(Flags, "Flags"))),)


def cuStreamCreateWithPriority(flags, priority):
    c, dev = ctx_dev()
    return (real.CUstream(new_stream(dev, c.handle, as_int(flags, "flags"))),)


def stream_destroy(hStream) -> None:
    h = handle_int(hStream)
    if h in (0, 1, 2) or h not in STATE.streams:
        raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"stream {h:#x} is not valid")
    _, st, _ = STATE.streams.pop(h)
    STATE.stream_flags.pop(h, None)
    st.close()


def stream_sync(hStream, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    STATE.dev(dev).request("stream_sync", stream=0 if st is None else st.handle)


def stream_query(hStream, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    if not STATE.dev(dev).request("stream_query", stream=0 if st is None else st.handle)["ready"]:
        raise CudaError(E.CUDA_ERROR_NOT_READY, "")


def stream_wait_event(hStream, hEvent, dev_default: int) -> None:
    dev, st = STATE.stream(hStream, dev_default)
    edev, ev = STATE.event(hEvent)
    if edev != dev:
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED, "waiting on another device's event")
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
        raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, "event and stream belong to different devices")
    ev.record(st)


def event_query(hEvent) -> None:
    _, ev = STATE.event(hEvent)
    if not ev.query():
        raise CudaError(E.CUDA_ERROR_NOT_READY, "")


def event_elapsed(hStart, hEnd) -> float:
    _, a = STATE.event(hStart)
    _, b = STATE.event(hEnd)
    return float(b.elapsed_ms(a))


def event_destroy(hEvent) -> None:
    h = handle_int(hEvent)
    entry = STATE.events.pop(h, None)
    if entry is None:
        raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"event {h:#x} is not valid")
    entry[1].close()


def cuEventCreate(Flags):
    c, dev = ctx_dev()
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
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "the host function is NULL")
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
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "flags must be 0")
    run_host_function(hStream, callback, userData, STATE.ctx().dev, callback=True)
    return ()
