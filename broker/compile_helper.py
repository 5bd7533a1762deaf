"""The compile helper: where a CPU executor's modules are compiled (NVRTC) and built (g++).

Compilers read files as they please (`#include`, `__has_include`, `#pragma GCC dependency`,
however a tenant spells them), so they do not run in the executor nor with the host's view.
Each CPU executor forks one helper before it confines itself; the helper then makes its own
view (`confine.View`: the compiler and system headers read-only, NVRTC and the CUDA headers,
KubeCASH's headers, its tenant's module cache as /cache, /dev/null; no network), drops to the
tenant's uid, and serves `build` requests (kubecash.client.protocol, channel `compile`) on a
stream socketpair, one at a time: CUDA C source or PTX in, a shared object out. The executor
then needs no exec and no view of the host.

Frames: a 4-byte little-endian length, then one MessagePack message.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Sequence

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, ProtocolError, error_from_code, map_exceptions
from kubecash.client.limits import COMPILED_IMAGE_MAX

from . import confine
from .backend_cpu import build_image
from .cpukernels import build as _build
from .cpukernels import nvrtc

log = logging.getLogger("kubecash.compile")
_HEADER = struct.Struct("<I")
VIEW_BYTES = 16 << 20        # the helper's tmpfs root holds only mount points
REPLY_MARGIN_S = 10.0        # past the compile's own bound: the helper is stuck


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise TimeoutError("no answer from the compile helper")
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the compile helper is gone")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> bytes:
    n, = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if n > max_bytes:
        raise ProtocolError(f"a compile-channel frame of {n} bytes exceeds {max_bytes}")
    return _recv_exact(sock, n, deadline)


class CompileHelper:
    """The executor's end: forks the helper (call before any thread starts) and asks it."""

    def __init__(self, cache_dir: str, *, view_at: str | None, uid: int | None, gid: int | None):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:                                  # the helper
            code = 1
            try:
                mine.close()
                _HelperServer(theirs, cache_dir, view_at, uid, gid).serve()
                code = 0
            except BaseException:   # noqa: BLE001  (anything: the helper must end here)
                log.exception("compile helper failed")
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock: socket.socket | None = mine
        self._rid = 0

    def build(self, source: str, options: Sequence[str], timeout_s: float, language: str = "cuda-c") -> bytes:
        """The built module's image, or the CudaError the build ended with."""
        if self._sock is None:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, "the compile helper is closed")
        self._rid += 1
        request = P.request("build", self._rid, source=source, options=list(options),
                            timeout_s=float(timeout_s), language=language)
        if len(request) > P.COMPILE.max_bytes:
            # Refused here: the helper would drop the channel (it cannot skip an oversize
            # frame), and a confined executor cannot fork another helper.
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"module build refused: its {language} is {len(source)} bytes, more than the "
                                  f"{P.COMPILE.max_bytes - (64 << 10)} a CPU device compiles in one module")
        try:
            _send_frame(self._sock, request)
            frame = _recv_frame(self._sock, COMPILED_IMAGE_MAX + (64 << 10),
                                time.monotonic() + timeout_s + REPLY_MARGIN_S)
        except (OSError, TimeoutError, ProtocolError) as e:
            self.close()     # its state is unknown now: no later build may read a stale reply
            raise error_from_code(E.CUDA_ERROR_OPERATING_SYSTEM,
                                  f"module build failed: the compile helper did not answer ({e})") from None
        msg = P.unpack(frame, COMPILED_IMAGE_MAX + (64 << 10))
        if msg.get("id") != self._rid:
            self.close()
            raise error_from_code(E.CUDA_ERROR_OPERATING_SYSTEM, "module build failed: a reply out of turn")
        P.raise_for_reply(msg)
        return P.check_reply(P.COMPILE, "build", msg)["image"]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()   # it reads EOF and exits (no kill: a confined executor signals only itself)
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def __enter__(self) -> CompileHelper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HelperServer:
    """The helper's end: make the view, drop privileges, answer builds."""

    def __init__(self, sock: socket.socket, cache_dir: str, view_at: str | None,
                 uid: int | None, gid: int | None):
        self.sock = sock
        confine.set_parent_death_signal()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        if uid is not None:
            os.chown(cache_dir, uid, gid)
        self.cache = cache_dir
        if view_at is not None:
            cxx = os.path.realpath(_build._compiler())
            include = str(_build._INCLUDE_DIR)
            v = confine.View(view_at, size_bytes=VIEW_BYTES, network=False)
            v.host_tree("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
            if not cxx.startswith("/usr/"):
                v.bind(os.path.dirname(cxx), os.path.dirname(cxx))
            if os.path.exists("/etc/ld.so.cache"):
                v.bind("/etc/ld.so.cache", "/etc/ld.so.cache")
            v.bind("/dev/null", "/dev/null", dev=True)
            v.bind(include, include)
            for d in nvrtc.prepare():          # loaded now; the headers are read per compile
                if not d.startswith("/usr/"):
                    v.bind(d, d)
            v.bind(cache_dir, "/cache", readonly=False, exec_=False)
            v.mkdir("/tmp", 0o1777)
            v.enter()
            nvrtc.in_view = True
            self.cache = "/cache"
        if uid is not None:
            confine.drop_to(uid, gid)
        confine.no_new_privs()

    def serve(self) -> None:
        while True:
            try:
                frame = _recv_frame(self.sock, P.COMPILE.max_bytes)
            except ConnectionError:
                return                          # the executor closed its end
            try:
                _, msg = P.decode(frame, P.COMPILE, P.COMPILE.max_bytes)
            except ProtocolError as e:
                _send_frame(self.sock, P.error_reply(0, e))
                continue
            _send_frame(self.sock, self._on_compile_build(msg))

    def _on_compile_build(self, msg: dict) -> bytes:
        try:
            with map_exceptions("module build", logger=log):
                image = build_image(msg["source"], msg["options"], cache_dir=self.cache,
                                    timeout_s=msg["timeout_s"], language=msg["language"])
            if len(image) > COMPILED_IMAGE_MAX:
                raise error_from_code(E.CUDA_ERROR_OUT_OF_MEMORY,
                                      f"the built module is {len(image)} bytes, over {COMPILED_IMAGE_MAX}")
        except CudaError as e:
            return P.error_reply(msg["id"], e)
        return P.reply(msg["id"], image=image)
