"""Device memory (Buffer) and pinned host memory shared with the executor (HostBuffer)."""
from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any

from .errors import KubecashError
from .resource import _Resource
from .stream import Stream, _stream_handle

if TYPE_CHECKING:
    from .device import Device


def _as_bytes_view(obj: Any, writable: bool = False) -> memoryview:
    mv = memoryview(obj)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    if writable and mv.readonly:
        raise ValueError("destination buffer is read-only")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


class Buffer(_Resource):
    """Device memory owned by this tenant's executor. `ptr` is a real device address."""

    def __init__(self, device: Device, ptr: int, size: int):
        self.device, self.ptr, self.size = device, ptr, size

    def __int__(self) -> int:
        return self.ptr

    def copy_from(self, src: Any, *, stream: Stream | None = None, offset: int = 0) -> None:
        """Copy host data (bytes, numpy array, any buffer, or a HostBuffer/Buffer) in."""
        if isinstance(src, (HostBuffer, Buffer)):
            n = src.size
            self._bounds(offset, n)
            self.device.request_or_submit("memcpy_dtod", stream, dst=self.ptr + offset, src=src.ptr,
                                      size=n, stream=_stream_handle(stream))
            return
        mv = _as_bytes_view(src)
        self._bounds(offset, mv.nbytes)
        self.device.write(self.ptr + offset, mv, stream)

    def copy_to(self, dst: Any = None, *, stream: Stream | None = None, offset: int = 0):
        """Copy out into `dst` (a writable buffer, or a new bytearray of the whole buffer)."""
        if dst is None:
            dst = bytearray(self.size - offset)
        if isinstance(dst, (HostBuffer, Buffer)):
            self._bounds(offset, dst.size)
            self.device.request_or_submit("memcpy_dtod", stream, dst=dst.ptr, src=self.ptr + offset,
                                      size=dst.size, stream=_stream_handle(stream))
            return dst
        mv = _as_bytes_view(dst, writable=True)
        self._bounds(offset, mv.nbytes)
        self.device.read(mv, self.ptr + offset, stream)
        return dst

    def fill(self, value: int, *, width: int = 1, stream: Stream | None = None) -> None:
        """memset: every `width`-byte element (1, 2 or 4) of the buffer set to `value`."""
        self.device.request_or_submit("memset", stream, dst=self.ptr, value=int(value), width=width,
                                  count=self.size // width, stream=_stream_handle(stream))

    def _bounds(self, offset: int, n: int) -> None:
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"{n} bytes at offset {offset} do not fit a {self.size}-byte buffer")

    def _release(self) -> None:
        d = self.device
        if d._ch is not None and not d.session._closed:
            try:
                d.request("mem_free", ptr=self.ptr)
            except KubecashError:
                pass  # the session or executor is gone, and the memory with it


class HostBuffer(_Resource):
    """Pinned host memory mapped into both this process and the executor (zero-copy).

    `view` is this process's memoryview of it; `ptr` is its device address, usable as a
    kernel argument and in copies. `mapping` is the mmap behind `view` (for ctypes'
    from_buffer, as the shim gives programs a host pointer); close() unmaps it."""

    def __init__(self, device: Device, ptr: int, size: int, mapping: mmap.mmap):
        self.device, self.ptr, self.size = device, ptr, size
        self.mapping = mapping
        self.view = memoryview(mapping)

    def _release(self) -> None:
        self.view.release()
        self.mapping.close()
        d = self.device
        if d._ch is not None and not d.session._closed:
            try:
                d.request("host_free", ptr=self.ptr)
            except KubecashError:
                pass
