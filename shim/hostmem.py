"""Host memory as cuda-python programs name it: ints, buffers (numpy, bytes, bytearray,
memoryview, ctypes arrays), ctypes pointers. The shim needs each one's address and a
writable view of the bytes there, the way cuda-python itself takes the address of
whatever it is given (it even writes into `bytes` objects)."""
from __future__ import annotations

import ctypes
from typing import Any

from kubecash.client.errors import CudaError, CUresult


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBUF_ANY_CONTIGUOUS = 0x0080 | 0x0008 | 0x0004 | 0x0010   # contiguous, ND, strides, format


def buffer_address(obj: Any) -> tuple[int, int] | None:
    """(address, length in bytes) of an object that exports a contiguous buffer, else None."""
    view = _PyBuffer()
    try:
        _get_buffer(obj, ctypes.byref(view), _PyBUF_ANY_CONTIGUOUS)
    except (TypeError, BufferError, ValueError):
        return None
    try:
        return int(view.buf or 0), int(view.len)
    finally:
        _release_buffer(ctypes.byref(view))


def host_address(obj: Any, what: str = "host pointer") -> tuple[int, int | None]:
    """(address, known length or None) of host memory given the ways cuda-python accepts."""
    if obj is None:
        return 0, None
    if isinstance(obj, bool):
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE, f"{what}: a bool is not an address")
    if isinstance(obj, int):
        return obj, None
    if isinstance(obj, (ctypes.c_void_p, ctypes.c_char_p)):
        return int(ctypes.cast(obj, ctypes.c_void_p).value or 0), None
    if isinstance(obj, ctypes._Pointer):
        return int(ctypes.cast(obj, ctypes.c_void_p).value or 0), None
    if isinstance(obj, (ctypes._SimpleCData, ctypes.Array, ctypes.Structure, ctypes.Union)):
        return ctypes.addressof(obj), ctypes.sizeof(obj)
    ai = getattr(obj, "__array_interface__", None)
    if isinstance(ai, dict) and "data" in ai:     # numpy arrays, contiguous or not
        if ai.get("strides") is not None:
            r = buffer_address(obj)
            if r is None:
                raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE,
                                f"{what}: the array is not contiguous")
            return r
        return int(ai["data"][0]), int(getattr(obj, "nbytes", 0)) or None
    r = buffer_address(obj)
    if r is not None:
        return r
    if hasattr(obj, "getPtr") and hasattr(obj, "__int__"):
        return int(obj), None
    raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE,
                    f"{what}: cannot take the address of a {type(obj).__name__}")


def host_view(obj: Any, n: int, what: str = "host buffer") -> tuple[int, memoryview]:
    """(address, writable byte view of n bytes) of host memory named by `obj`."""
    addr, known = host_address(obj, what)
    if n == 0:
        return addr, memoryview(bytearray(0))
    if addr == 0:
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE, f"{what} is NULL")
    if known is not None and known < n:
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE,
                        f"{what} holds {known} bytes, {n} were asked for")
    return addr, memoryview((ctypes.c_char * n).from_address(addr)).cast("B")


def as_int(value: Any, what: str = "value") -> int:
    """An integer argument given as int, numpy scalar, CUdeviceptr/handle or enum member."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CudaError(CUresult.CUDA_ERROR_INVALID_VALUE,
                        f"{what}: expected an integer, got {type(value).__name__}") from None
