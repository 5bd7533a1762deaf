"""Operations that move data: copies in every direction and memset."""
from __future__ import annotations

import ctypes

from kubecash.client import protocol as P
from kubecash.client.errors import E

from .state import (
    SessionState,
    _err,
)


class CopyOps:
    def op_memcpy_htod(self, s: SessionState, msg: dict, ident: bytes):
        dst, n = msg["dst"], msg["size"]
        self._check_range(s, dst, n, "destination")
        st = self._stream(s, msg)
        if "data" in msg:
            data = msg["data"]
            if len(data) != n:
                raise _err(E.CUDA_ERROR_INVALID_VALUE, f"inline data is {len(data)} bytes, size says {n}")
            fn = lambda: self.backend.htod(dst, data, n)  # noqa: E731
        elif "offset" in msg:
            if msg.get("async"):
                raise _err(E.CUDA_ERROR_INVALID_VALUE, "a staged copy cannot be asynchronous")
            src = self._staging_range(s, msg["offset"], n)
            fn = lambda: self.backend.htod(dst, src, n)  # noqa: E731
        else:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "memcpy_htod needs 'data' or 'offset'")
        self._queue_op(s, msg, ident, fn, stream=st, device=True)

    def op_memcpy_dtoh(self, s: SessionState, msg: dict, ident: bytes):
        src, n = msg["src"], msg["size"]
        self._check_range(s, src, n, "source")
        st = self._stream(s, msg)
        if "offset" in msg:
            dst = self._staging_range(s, msg["offset"], n)
            fn = lambda: self.backend.dtoh(dst, src, n)  # noqa: E731
        elif n <= P.INLINE_MAX:
            def fn():
                buf = ctypes.create_string_buffer(n)
                self.backend.dtoh(ctypes.addressof(buf), src, n)
                return {"data": buf.raw}
        else:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"an inline copy is limited to {P.INLINE_MAX} bytes; use the staging segment")
        self._queue_op(s, msg, ident, fn, stream=st, device=True)

    def op_memcpy_dtod(self, s: SessionState, msg: dict, ident: bytes):
        dst, src, n = msg["dst"], msg["src"], msg["size"]
        self._check_range(s, dst, n, "destination")
        self._check_range(s, src, n, "source")
        self._queue_op(s, msg, ident, lambda: self.backend.dtod(dst, src, n), stream=self._stream(s, msg),
                       device=True)

    def op_memset(self, s: SessionState, msg: dict, ident: bytes):
        dst, width, count = msg["dst"], msg["width"], msg["count"]
        # width: one of the protocol's declared choices
        self._check_range(s, dst, width * count, "destination")
        value = msg["value"]
        self._queue_op(s, msg, ident, lambda: self.backend.memset(dst, value, width, count),
                       stream=self._stream(s, msg), device=True)
