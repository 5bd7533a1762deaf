"""Kernel output (device printf): captured from fd 1 and sent to the session that ran the kernel."""
from __future__ import annotations

import ctypes
import os
import select
import sys
import threading

from kubecash.client import protocol as P

from .state import (
    SessionState,
)


class _Discard:
    """A sys.stdout that drops what it is given (no /dev/null inside an executor's jail)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class OutputCapture:
    # -- kernel output (device printf) ---------------------------------------------------
    # Kernels write to this process's stdout (the CPU backend's printf; the CUDA driver's
    # device printf buffer). fd 1 is a pipe drained by a thread into a bounded buffer; after
    # each kernel it goes to the session that ran it, as a "stdout" event the client prints.
    # (All sessions of an executor are one tenant: nothing crosses tenants.)
    OUTPUT_MAX = 1 << 20

    def _capture_output(self) -> None:
        r, w = os.pipe()
        os.dup2(w, 1)
        os.close(w)
        os.set_blocking(r, False)
        sys.stdout = _Discard()              # Python-level prints of ours never mix in
        self._out_fd = r
        self._out = bytearray()
        self._out_dropped = 0
        self._out_lock = threading.Lock()
        threading.Thread(target=self._drain_output, name="stdout", daemon=True).start()

    def _drain_output(self) -> None:
        """Keeps the pipe from filling (a full pipe would block a printing kernel)."""
        while True:
            try:
                select.select([self._out_fd], [], [])
            except (OSError, ValueError):
                return
            with self._out_lock:
                if not self._read_output_locked():
                    return

    def _read_output_locked(self) -> bool:
        """Move what the pipe holds into the buffer; reading only under the lock means no
        bytes are ever in flight outside it. False once the pipe is closed."""
        while True:
            try:
                data = os.read(self._out_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            room = max(0, self.OUTPUT_MAX - len(self._out))
            self._out += data[:room]
            self._out_dropped += len(data) - min(len(data), room)

    def _forward_output(self, s: SessionState) -> None:
        if getattr(self, "_out_fd", None) is None:
            return
        _libc_fflush(None)                      # C stdio buffers what kernels print
        with self._out_lock:
            self._read_output_locked()
            data, dropped = bytes(self._out), self._out_dropped
            self._out.clear()
            self._out_dropped = 0
        if dropped:
            data += f"\n[kubecash: {dropped} bytes of kernel output dropped]\n".encode()
        if data and s.ident is not None:
            ident = s.ident
            self._call_in_main(lambda: self._send(ident, P.event("stdout", data=data)))


try:   # looked up once: every ctypes.CDLL() makes a class that only the full GC frees
    _fflush = ctypes.CDLL(None).fflush
except (OSError, AttributeError):
    _fflush = None


def _libc_fflush(stream) -> None:
    if _fflush is not None:
        _fflush(stream)
