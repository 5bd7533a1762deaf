"""Builds a brokered module from the table, the shim's implementations and the real module.

For every attribute of the real module: an API call listed as BROKERED or LOCAL becomes the
shim's implementation wrapped to return cuda-python's tuples and result enum; an unlisted or
UNSUPPORTED call becomes a stub returning NOT_SUPPORTED; everything else (types, enums,
constants, helpers) is the real module's own object."""
from __future__ import annotations

import functools
import re
import threading
import types
from collections.abc import Callable
from typing import Any

import kubecash.client as kc
from kubecash.client.errors import CudaError

from . import table as T
from .errors import driver_result, explain, nvrtc_result, runtime_result, say_once


def arity(fn: Any) -> int:
    """How many values the real call returns (result code included), from its docstring."""
    doc = getattr(fn, "__doc__", None) or ""
    m = re.search(r"\nReturns\n-+\n", doc)
    if not m:
        return 1
    body = doc[m.end():]
    end = re.search(r"\n\n(?=\S[^\n]*\n-+\n)", body)
    if end:
        body = body[:end.start()]
    n = sum(1 for line in body.splitlines() if line.strip() and not line[0].isspace())
    return max(1, n)


def is_api(canonical: str, name: str, obj: Any) -> bool:
    if isinstance(obj, type) or not callable(obj):
        return False
    prefixes = T.API_PREFIXES.get(canonical, ())
    return name in T.TABLE.get(canonical, {}) or any(name.startswith(p) for p in prefixes)


class _LastError(threading.local):
    code = 0


def _result_maker(canonical: str, real: Any) -> Callable[[int], Any]:
    if canonical == T.RUNTIME:
        return lambda code: runtime_result(real, code)
    if canonical in (T.NVRTC, T.NVRTC_V2):
        return lambda code: nvrtc_result(real, code)
    return lambda code: driver_result(real, code)


def wrap(canonical: str, name: str, impl: Callable, real_fn: Any, real: Any,
         last: _LastError | None) -> Callable:
    """An implementation returning its outputs, made into a cuda-python style call."""
    n_out = arity(real_fn) - 1
    result = _result_maker(canonical, real)
    ok = result(0)
    is_runtime = last is not None

    if is_runtime and name in ("cudaGetLastError", "cudaPeekAtLastError"):
        reset = name == "cudaGetLastError"

        @functools.wraps(real_fn)
        def last_error(*args, **kwargs):
            code = last.code
            if reset:
                last.code = 0
            return (result(code),)
        return last_error

    @functools.wraps(real_fn)
    def call(*args, **kwargs):
        try:
            out = impl(*args, **kwargs)
        except CudaError as e:          # raised here or answered by the broker: the same type
            code, message = e.code, e.message
        except kc.KubecashError as e:            # the broker is gone or the session ended
            code, message = int(kc.CUresult.CUDA_ERROR_UNKNOWN), str(e)
        else:
            return (ok, *out)
        if code != 600:                          # NOT_READY is an answer, not a failure
            explain(name, code, message)
            if is_runtime:
                last.code = code
        return (result(code), *([None] * n_out))
    call.__kubecash__ = "implemented"
    return call


def unsupported(canonical: str, name: str, real_fn: Any, real: Any) -> Callable:
    if canonical == T.PYNVML:
        @functools.wraps(real_fn)
        def nvml_stub(*args, **kwargs):
            say_once(f"unsupported:{name}", f"{name} is not supported on a brokered device")
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        nvml_stub.__kubecash__ = "unsupported"
        return nvml_stub
    n_out = arity(real_fn) - 1
    code = _result_maker(canonical, real)(int(kc.CUresult.CUDA_ERROR_NOT_SUPPORTED))

    @functools.wraps(real_fn)
    def stub(*args, **kwargs):
        say_once(f"unsupported:{canonical}.{name}",
                 f"{name} is not supported on a brokered device: returning {code.name}")
        return (code, *([None] * n_out))
    stub.__kubecash__ = "unsupported"
    return stub


def populate(module: types.ModuleType, canonical: str, real: Any, impls: types.ModuleType) -> None:
    last = _LastError() if canonical == T.RUNTIME else None
    rows = T.TABLE.get(canonical, {})
    for name in dir(real):
        if name.startswith("__") and name.endswith("__"):
            continue
        obj = getattr(real, name)
        if not is_api(canonical, name, obj):
            setattr(module, name, obj)                  # types, enums, constants, helpers
            continue
        kind = T.kind(canonical, name)
        if T.passthrough(canonical, name) or (name not in rows and canonical in T.PASSTHROUGH_UNLISTED):
            setattr(module, name, obj)
        elif kind in (T.BROKERED, T.LOCAL):
            impl = getattr(impls, name, None)
            if impl is None:
                raise ImportError(f"kubecash.shim: {canonical}.{name} is in the table but has no "
                                  "implementation")
            if canonical in (T.DRIVER, T.RUNTIME):
                setattr(module, name, wrap(canonical, name, impl, obj, real, last))
            else:                    # NVRTC and pynvml implementations answer as the real ones
                setattr(module, name, functools.wraps(obj)(impl))
        else:
            setattr(module, name, unsupported(canonical, name, obj, real))
    module.__doc__ = (f"KubeCASH brokered {canonical}: cuda-python's API, run by the tenant's "
                      f"executor.\n\n{getattr(real, '__doc__', '') or ''}")
    module.__all__ = [n for n in dir(real) if not n.startswith("_")]
    module.__kubecash_shim__ = canonical
