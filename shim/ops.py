"""Operations shared by the brokered driver and runtime modules: copies, memsets, launches,
module loads. Each maps onto kubecash.client requests; the executor checks every range and
handle against the tenant's own tables, so nothing here needs to be trusted."""
from __future__ import annotations

import ctypes
import enum
from typing import Any

import kubecash.client as kc
from kubecash.client.errors import CudaError, E

from . import images
from .errors import say_once
from .hostmem import as_int, host_address, host_view
from .state import STATE, Func, Mod, handle_int


def _stream_handle(st: kc.Stream | None) -> int:
    return 0 if st is None else st.handle


def _resolve_stream(stream: Any, dev: int) -> tuple[int, kc.Stream | None]:
    return STATE.stream(stream, dev)


def _exec_host(addr: int, n: int) -> tuple[int, int] | None:
    """(device, executor address) when [addr, addr+n) is pinned memory shared with an executor."""
    p = STATE.pinned_at(addr, n)
    if p is None:
        return None
    return p.dev, p.buf.ptr + (addr - p.local)


def htod(dst: Any, src: Any, n: Any, stream: Any = None, *, default_dev: int) -> None:
    n = as_int(n, "ByteCount")
    d = handle_int(dst)
    if n == 0:
        return
    dev, st = _resolve_stream(stream, STATE.pointer_device(d, default_dev))
    addr, view = host_view(src, n, "source host buffer")
    pinned = _exec_host(addr, n)
    if pinned is not None:          # pinned memory the executor maps: copy there directly
        STATE.dev(dev).request_or_submit("memcpy_dtod", st, dst=d, src=pinned[1], size=n,
                                     stream=_stream_handle(st))
        return
    STATE.dev(dev).write(d, view, st)


def dtoh(dst: Any, src: Any, n: Any, stream: Any = None, *, default_dev: int) -> None:
    n = as_int(n, "ByteCount")
    s = handle_int(src)
    if n == 0:
        return
    dev, st = _resolve_stream(stream, STATE.pointer_device(s, default_dev))
    addr, view = host_view(dst, n, "destination host buffer")
    pinned = _exec_host(addr, n)
    if pinned is not None:
        STATE.dev(dev).request_or_submit("memcpy_dtod", st, dst=pinned[1], src=s, size=n,
                                     stream=_stream_handle(st))
        return
    STATE.dev(dev).read(view, s, st)


def dtod(dst: Any, src: Any, n: Any, stream: Any = None, *, default_dev: int) -> None:
    n = as_int(n, "ByteCount")
    if n == 0:
        return
    d, s = handle_int(dst), handle_int(src)
    dev, st = _resolve_stream(stream, STATE.pointer_device(d, default_dev))
    STATE.dev(dev).request_or_submit("memcpy_dtod", st, dst=d, src=s, size=n, stream=_stream_handle(st))


def htoh(dst: Any, src: Any, n: Any, stream: Any = None, *, default_dev: int) -> None:
    n = as_int(n, "ByteCount")
    if n == 0:
        return
    dev, st = _resolve_stream(stream, default_dev)
    if st is not None:
        st.synchronize()              # earlier work on the stream may write the source
    a, _ = host_view(dst, n, "destination host buffer")
    b, _ = host_view(src, n, "source host buffer")
    ctypes.memmove(a, b, n)


def is_device_pointer(p: Any) -> bool:
    """True when `p` (an int or CUdeviceptr) lies in device memory or a pinned mapping's
    executor address: what cudaMemcpyDefault and cuMemcpy infer directions from."""
    if isinstance(p, int) or hasattr(p, "getPtr"):
        try:
            v = int(p)
        except (TypeError, ValueError):
            return False
        return STATE.alloc_containing(v) is not None or STATE.pinned_by_exec(v) is not None
    return False


def copy_any(dst: Any, src: Any, n: Any, stream: Any = None, *, default_dev: int) -> None:
    """A copy whose direction comes from the pointers (cuMemcpy, cudaMemcpyDefault)."""
    dd, sd = is_device_pointer(dst), is_device_pointer(src)
    fn = {(True, True): dtod, (True, False): htod, (False, True): dtoh, (False, False): htoh}[(dd, sd)]
    fn(dst, src, n, stream, default_dev=default_dev)


def memset(dst: Any, value: Any, width: int, count: Any, stream: Any = None, *,
           default_dev: int) -> None:
    count = as_int(count, "N")
    if count == 0:
        return
    d = handle_int(dst)
    dev, st = _resolve_stream(stream, STATE.pointer_device(d, default_dev))
    v = as_int(value, "value") & ((1 << (8 * width)) - 1)
    STATE.dev(dev).request_or_submit("memset", st, dst=d, value=v, width=width, count=count,
                                 stream=_stream_handle(st))


# -- modules ------------------------------------------------------------------------------
def load_module(data: bytes, ctx_handle: int, dev: int) -> int:
    """Load an image on `dev`. A CPU device runs PTX (fatbins: their PTX entry); a CUBIN
    NVRTC made in this program runs there as the PTX NVRTC made with it."""
    if not data.strip(b"\0 \t\r\n"):
        raise CudaError(E.CUDA_ERROR_INVALID_IMAGE, "empty module image")
    kind = images.image_kind(data)
    device = STATE.dev(dev)
    if device.kind == "cpu" and kind == "cubin":
        ptx = STATE.images.ptx_for(data)
        if ptx is not None:
            data, kind = ptx, "ptx"
    fields: dict[str, Any] = {"kind": kind, "image": data}
    r = device.request("module_load", **fields)
    h = STATE.new_handle()
    STATE.modules[h] = Mod(dev, kc.Module(device, r["module"]), ctx_handle,
                           images.ptx_signatures(data))
    return h


def get_function(hmod: Any, name: Any) -> int:
    m = STATE.module(hmod)
    nm = name.decode() if isinstance(name, (bytes, bytearray)) else str(name)
    nm = nm.rstrip("\0")
    r = STATE.dev(m.dev).request("get_function", module=m.module.handle, name=nm)
    sizes: tuple[int, ...] | None = tuple(r["param_sizes"]) if r.get("param_sizes") is not None else None
    if m.signatures and nm in m.signatures:
        sizes = m.signatures[nm]     # the image's own declaration of the kernel's parameters
    h = STATE.new_handle()
    mh = next(k for k, v in STATE.modules.items() if v is m)
    STATE.functions[h] = Func(m.dev, r["function"], nm, sizes, mh)
    return h


# -- kernel arguments -----------------------------------------------------------------------
def _ctype_bytes(inst: Any) -> bytes:
    return ctypes.string_at(ctypes.addressof(inst), ctypes.sizeof(inst))


def encode_params(kernel_params: Any, f: Func) -> list[bytes]:
    """The raw bytes of each kernel parameter, from either form cuLaunchKernel accepts."""
    kp = kernel_params
    if kp is None or (isinstance(kp, int) and not isinstance(kp, bool) and kp == 0):
        return []
    if (isinstance(kp, (tuple, list)) and len(kp) == 2 and isinstance(kp[0], (tuple, list))
            and isinstance(kp[1], (tuple, list))):
        values, types = kp
        if len(values) != len(types):
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                            f"kernelParams: {len(values)} values but {len(types)} types")
        out = []
        for v, t in zip(values, types, strict=True):   # lengths checked above
            if t is None:
                # cuda-python passes the value a handle object stores (CUdeviceptr...),
                # a ctypes structure's bytes, or an enum as a 32-bit int.
                if callable(getattr(v, "getPtr", None)):
                    out.append(int(v).to_bytes(8, "little"))
                elif isinstance(v, ctypes.Structure):
                    out.append(_ctype_bytes(v))
                elif isinstance(v, enum.Enum):
                    out.append(int(v.value).to_bytes(4, "little", signed=True))
                else:
                    raise TypeError(f"Provided argument is of type {type(v)} but expected Type "
                                    f"{type(None)} or CUDA Binding structure with getPtr() "
                                    "attribute")
            else:
                inst = v if isinstance(v, t) else t(v)
                out.append(_ctype_bytes(inst))
        return out
    # The C form: the address of an array of pointers, one per parameter.
    if f.param_sizes is None:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                        f"kernel '{f.name}': its parameter sizes are unknown (no PTX signature "
                        "and none from the device), so kernelParams given as an array of "
                        "pointers cannot be read; pass ((values...), (ctypes types...)) instead")
    if hasattr(kp, "__array_interface__") or not isinstance(kp, int):
        addr, known = host_address(kp, "kernelParams")
        if known is not None and known < 8 * len(f.param_sizes):
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                            f"kernelParams holds {known // 8} pointers; kernel '{f.name}' takes "
                            f"{len(f.param_sizes)} parameters")
    else:
        addr = kp
    if not f.param_sizes:
        return []
    ptrs = (ctypes.c_void_p * len(f.param_sizes)).from_address(addr)
    out = []
    for i, n in enumerate(f.param_sizes):
        if not ptrs[i]:
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"kernelParams[{i}] is NULL")
        out.append(ctypes.string_at(ptrs[i], n))
    return out


def launch(f: Any, grid: tuple, block: tuple, shared: Any, stream: Any, kernel_params: Any,
           extra: Any) -> None:
    fn = STATE.function(f)
    if extra not in (None, 0) and handle_int(extra) != 0:
        raise CudaError(E.CUDA_ERROR_NOT_SUPPORTED,
                        "cuLaunchKernel 'extra' (CU_LAUNCH_PARAM_BUFFER_POINTER) is not supported; "
                        "pass kernelParams")
    g = [_dim(x, "grid") for x in grid]
    b = [_dim(x, "block") for x in block]
    args = encode_params(kernel_params, fn)
    if fn.param_sizes is not None:
        if len(args) != len(fn.param_sizes) or any(len(a) != n for a, n in zip(args, fn.param_sizes, strict=True)):
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                            f"kernel '{fn.name}' takes {len(fn.param_sizes)} parameters of sizes "
                            f"{list(fn.param_sizes)} bytes; got {len(args)} of sizes "
                            f"{[len(a) for a in args]}")
    dev, st = _resolve_stream(stream, fn.dev)
    if dev != fn.dev:
        raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, "the stream belongs to another device")
    STATE.dev(dev).submit("launch", function=fn.handle, grid=g, block=b,
                         shared=as_int(shared, "sharedMemBytes"), stream=_stream_handle(st),
                         args=args)


def _dim(x: Any, what: str) -> int:
    try:
        v = int(x)           # cuda-python takes unsigned int: floats truncate, as there
    except (TypeError, ValueError):
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{what} dimension {x!r} is not a number") from None
    if v < 1:
        raise CudaError(E.CUDA_ERROR_INVALID_VALUE, f"{what} dimension {v} must be at least 1")
    return v


def unsupported_note(name: str, why: str) -> None:
    say_once(f"note:{name}", f"{name}: {why}")
