"""The pythonic client API, in the spirit of cuda.core.

    import kubecash.client as kc
    with kc.connect() as session:                     # KUBECASH_BROKER or an explicit address
        dev = session.device("cpu0")
        a = dev.allocate(n * 4); a.copy_from(np.arange(n, dtype=np.float32))
        mod = dev.load_module(source=SRC)
        k = mod.get_kernel("vadd")
        s = dev.create_stream()
        dev.launch(k, grid=(n // 256,), block=(256,), args=[a, b, c, np.int32(n)], stream=s)
        s.synchronize(); out = c.copy_to(np.empty(n, np.float32))

Objects are made only by their owner (a Device allocates, creates streams and loads
modules), every resource has an idempotent close() and is a context manager.
"""
from __future__ import annotations

import itertools
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from . import protocol as P
from .errors import BrokerUnavailable, CudaError, CUresult, KubecashError, ProtocolError, error_from_code

ENV_BROKER = "KUBECASH_BROKER"
HELLO_TIMEOUT_S = 10.0

_contexts: dict[int, zmq.Context] = {}      # pid -> this library's context, never terminated


def _context() -> zmq.Context:
    """The one ZeroMQ context this library uses in this process. It is never terminated, and
    no session owns it: with a context per session, a session dropped unclosed was collected
    in one cycle with its sockets, the collector cleared the context's weak references to them
    before any finalizer ran, and Context.__del__ then waited in term() forever for sockets it
    could no longer close. Sockets are closed by their sessions, or else by their own
    finalizers (LINGER 0, so that never blocks). A forked child gets a new context; the
    parent's stays referenced, so it is never collected in the child either. (No lock, which
    a fork could inherit held: two threads racing here keep one context; the other has no
    sockets, so its collection returns at once.)"""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        ctx = _contexts.setdefault(pid, zmq.Context())
    return ctx


def connect(address: str | None = None, *, timeout: float = HELLO_TIMEOUT_S) -> Session:
    """Open a session with the broker at `address` (default: $KUBECASH_BROKER)."""
    address = address or os.environ.get(ENV_BROKER)
    if not address:
        raise KubecashError(f"no broker address: pass one or set {ENV_BROKER}")
    return Session(address, timeout=timeout)


class _Resource:
    """Idempotent close() and context-manager support for every client object."""
    _closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
    # No __del__: a finalizer would talk to the executor from whatever thread the garbage
    # collector runs on. What a session still holds is freed when the session ends.


class _Channel:
    """One DEALER socket and the bookkeeping to match replies to request ids."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.stash: dict[int, dict] = {}
        self.abandoned: set[int] = set()     # ids whose waiter gave up: their replies are dropped
        # What the far end accepts: ZeroMQ drops a larger frame (and the connection) with no
        # reply, so a request past it is refused here rather than left waiting forever.
        self.max_bytes = P.MAX_MESSAGE_BYTES

    def close(self) -> None:
        self.sock.close()


class Session(_Resource):
    """A connection to the broker on behalf of this process (one tenant)."""

    def __init__(self, address: str, *, timeout: float = HELLO_TIMEOUT_S):
        self.address = address
        self.tenant_dir = (os.path.dirname(address[len("ipc://"):])
                           if address.startswith("ipc://") else None)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ctx = _context()
        self._broker = _Channel(self._ctx, address)
        self._broken: KubecashError | None = None
        self._failed: dict[str, CudaError] = {}     # device -> sticky error
        self._devices: dict[str, Device] = {}
        try:
            hello = self._call(self._broker, "hello", timeout=timeout, pid=os.getpid(),
                               client="kubecash.client")
        except BaseException:
            self._broker.close()
            self._closed = True
            raise
        self.token: bytes = hello["session"]
        self.tenant: str = hello["tenant"]
        self._device_info = {d["name"]: d for d in hello["devices"]}
        self._hb_stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat,
                                    args=(hello["heartbeat_interval"], hello["heartbeat_timeout"]),
                                    name="kubecash-heartbeat", daemon=True)
        self._hb.start()

    # -- public -----------------------------------------------------------------------------
    @property
    def devices(self) -> list[Device]:
        return [self.device(name) for name in self._device_info]

    def device(self, name: str | int = 0) -> Device:
        if isinstance(name, int):
            names = list(self._device_info)
            if not 0 <= name < len(names):
                raise error_from_code(CUresult.CUDA_ERROR_INVALID_DEVICE,
                                      f"device index {name} out of range (have {len(names)})")
            name = names[name]
        with self._lock:
            self._check_open()
            if name not in self._device_info:
                raise error_from_code(CUresult.CUDA_ERROR_INVALID_DEVICE,
                                      f"no device '{name}' for tenant '{self.tenant}' "
                                      f"(have: {', '.join(self._device_info)})")
            if name not in self._devices:
                self._devices[name] = Device(self, self._device_info[name])
            return self._devices[name]

    def status(self) -> dict:
        """The broker's view of this tenant: sessions, memory and device time per device."""
        return self._call(self._broker, "status", session=self.token)

    # -- plumbing --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise KubecashError("session is closed")
        if self._broken is not None:
            raise self._broken

    def _send(self, ch: _Channel, op: str, fields: dict, *, asynchronous: bool = False) -> int:
        rid = next(self._ids)
        msg = {"v": P.VERSION, "id": rid, "op": op, **fields}
        if asynchronous:
            msg["async"] = True
        frame = P.pack(msg)
        if len(frame) > ch.max_bytes:
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_VALUE,
                                  f"{op} request of {len(frame)} bytes exceeds the broker's "
                                  f"max_message_bytes ({ch.max_bytes})")
        ch.sock.send(frame)
        return rid

    def _wait(self, ch: _Channel, rid: int, *, timeout: float | None = None,
              watch: str | None = None) -> dict:
        """Wait for the reply to `rid` on `ch`, watching the broker for executor failures."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(ch.sock, zmq.POLLIN)
        if ch is not self._broker:
            poller.register(self._broker.sock, zmq.POLLIN)
        while True:
            msg = ch.stash.pop(rid, None)
            if msg is not None:
                if msg.get("ok"):
                    return msg
                raise error_from_code(msg.get("code", CUresult.CUDA_ERROR_UNKNOWN),
                                      str(msg.get("error", "")), log=str(msg.get("log", "")))
            if watch is not None and watch in self._failed:   # that device's executor died
                raise self._failed[watch]
            if self._broken is not None:
                raise self._broken
            wait_ms = 100
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    ch.abandoned.add(rid)
                    raise BrokerUnavailable(f"no answer from {self.address} within {timeout:g} s")
                wait_ms = min(wait_ms, max(1, int(left * 1000)))
            for sock, _ in poller.poll(wait_ms):
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch(ch if sock is ch.sock else self._broker, frame)

    def _dispatch(self, ch: _Channel, frame: bytes) -> None:
        try:
            msg = P.unpack(frame)
        except ProtocolError:
            return
        if msg.get("event") == "stdout" and isinstance(msg.get("data"), bytes):
            # What this session's kernels printed (device printf), at the next call, like
            # CUDA delivering its printf buffer at synchronization.
            out = getattr(sys.stdout, "buffer", None)
            if out is not None:
                sys.stdout.flush()
                out.write(msg["data"])
                out.flush()
            else:
                sys.stdout.write(msg["data"].decode(errors="replace"))
            return
        if msg.get("event") == "session_ended":       # e.g. the tenant was removed
            self._broken = error_from_code(msg.get("code", CUresult.CUDA_ERROR_DEINITIALIZED),
                                           str(msg.get("error", "session ended by the broker")))
        elif msg.get("event") == "executor_died" and isinstance(msg.get("device"), str):
            self._failed[msg["device"]] = error_from_code(
                msg.get("code", CUresult.CUDA_ERROR_LAUNCH_FAILED), str(msg.get("error", "")))
        elif isinstance(msg.get("id"), int) and msg["id"]:
            if msg["id"] in ch.abandoned:
                ch.abandoned.discard(msg["id"])
            else:
                ch.stash[msg["id"]] = msg

    def _call(self, ch: _Channel, op: str, *, timeout: float | None = None,
              watch: str | None = None, **fields: Any) -> dict:
        with self._lock:
            if op != "hello":
                self._check_open()
            return self._wait(ch, self._send(ch, op, fields), timeout=timeout, watch=watch)

    def _heartbeat(self, interval: float, timeout: float) -> None:
        ch = _Channel(self._ctx, self.address)
        try:
            last_ok = time.monotonic()
            while not self._hb_stop.wait(interval):
                ch.sock.send(P.pack({"v": P.VERSION, "id": 1, "op": "heartbeat",
                                     "session": self.token}))
                deadline = time.monotonic() + timeout
                # Short polls, so close() never waits long for this thread.
                while not self._hb_stop.is_set() and time.monotonic() < deadline:
                    if not ch.sock.poll(100):
                        continue
                    try:
                        msg = P.unpack(ch.sock.recv())
                    except ProtocolError:
                        continue
                    if msg.get("event") == "throttled":
                        # The broker is alive but leaves this tenant's requests unread for a
                        # while (max_requests_per_tenant_s): wait on, the answer will come.
                        pause = msg.get("seconds")
                        pause = min(float(pause), 60.0) if isinstance(pause, (int, float)) else 0.0
                        last_ok = time.monotonic() + max(0.0, pause)
                        deadline = max(deadline, last_ok + timeout)
                        continue
                    if msg.get("ok"):
                        last_ok = time.monotonic()
                    elif not self._closed:
                        self._broken = error_from_code(msg.get("code", 201),
                                                       f"session ended by the broker: {msg.get('error')}")
                        return
                    break
                if time.monotonic() - last_ok > timeout and not self._closed:
                    self._broken = BrokerUnavailable(
                        f"the broker at {self.address} stopped answering heartbeats")
                    return
        except zmq.ZMQError:
            return                           # the session is closing under us
        finally:
            ch.close()

    def _release(self) -> None:
        self._hb_stop.set()
        with self._lock:
            for d in list(self._devices.values()):
                d._disconnect()
            if self._broken is None:
                try:
                    self._wait(self._broker, self._send(self._broker, "close",
                                                        {"session": self.token}), timeout=5)
                except KubecashError:
                    pass
            self._broker.close()
        self._hb.join(timeout=5)


class Device:
    """One device as this tenant sees it: its quota, not the physical card."""

    def __init__(self, session: Session, info: dict):
        self.session = session
        self.name: str = info["name"]
        self.kind: str = info["kind"]
        self.properties: dict = info
        self.memory_limit: int = info["memory_limit"]
        self._ch: _Channel | None = None
        self._staging: mmap.mmap | None = None
        self._staging_size = 0
        self._queue_window = 0       # async requests allowed in flight (from the executor)
        self._posted = 0             # async requests sent since the last context sync

    @property
    def total_memory(self) -> int:
        return self.memory_limit

    def __repr__(self) -> str:
        return f"<kubecash Device {self.name} ({self.properties.get('model', self.kind)})>"

    # -- connection to this tenant's executor for the device --------------------------------
    def _conn(self) -> _Channel:
        s = self.session
        if self._ch is None:
            if s.tenant_dir is None:
                raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                                      "only ipc:// broker addresses are supported yet")
            r = s._call(s._broker, "open_device", session=s.token, device=self.name,
                        timeout=60, watch=self.name)
            self._ch = _Channel(s._ctx, f"ipc://{s.tenant_dir}/{r['address']}")
            a = s._wait(self._ch, s._send(self._ch, "attach", {"session": s.token}),
                        watch=self.name, timeout=60)
            self.memory_limit = a["memory_limit"]
            if isinstance(a.get("max_message_bytes"), int):
                self._ch.max_bytes = a["max_message_bytes"]
            # The executor queues at most max_queued_ops per session: like a full CUDA push
            # buffer, the client blocks (a context sync) well before that.
            q = a.get("max_queued_ops")
            self._queue_window = max(1, int(q) // 2) if isinstance(q, int) else 1 << 62
            self._posted = 0
            if a["staging"]:
                path = os.path.join(s.tenant_dir, "shm", a["staging"])
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    self._staging = mmap.mmap(fd, a["staging_size"])
                finally:
                    os.close(fd)
                    os.unlink(path)   # both sides have it mapped; nothing to leak on disk
                self._staging_size = a["staging_size"]
        return self._ch

    def _disconnect(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._ch is not None:
            self._ch.close()
            self._ch = None

    def _call(self, op: str, **fields: Any) -> dict:
        s = self.session
        with s._lock:
            s._check_open()
            if self.name in s._failed:
                raise s._failed[self.name]
            ch = self._conn()
            if op == "ctx_sync":
                self._posted = 0
            return s._wait(ch, s._send(ch, op, {"session": s.token, **fields}), watch=self.name)

    def _post(self, op: str, **fields: Any) -> None:
        """Send an asynchronous request: errors surface at the next synchronization."""
        s = self.session
        with s._lock:
            s._check_open()
            if self.name in s._failed:
                raise s._failed[self.name]
            ch = self._conn()
            s._send(ch, op, {"session": s.token, **fields}, asynchronous=True)
            self._posted += 1
            if self._posted >= self._queue_window:
                # Back-pressure: wait for the queue to drain. An error of earlier async
                # work surfaces here, as CUDA may report it from any later call.
                self._posted = 0
                s._wait(ch, s._send(ch, "ctx_sync", {"session": s.token}), watch=self.name)

    # -- memory ---------------------------------------------------------------------------
    def allocate(self, size: int) -> Buffer:
        return Buffer(self, self._call("mem_alloc", size=int(size))["ptr"], int(size))

    def allocate_host(self, size: int) -> HostBuffer:
        """Pinned, device-mapped host memory shared with the executor (zero-copy)."""
        r = self._call("host_alloc", size=int(size))
        path = os.path.join(self.session.tenant_dir, "shm", r["path"])
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                m = mmap.mmap(fd, int(size))
            finally:
                os.close(fd)
        except OSError:
            self._call("host_free", ptr=r["ptr"])
            raise
        self._call("host_mapped", ptr=r["ptr"])
        return HostBuffer(self, r["ptr"], int(size), m)

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of this tenant's quota on the device."""
        r = self._call("mem_info")
        return r["free"], r["total"]

    def _htod(self, dst: int, src: memoryview, stream: Stream | None) -> None:
        n = src.nbytes
        sh = _stream_handle(stream)
        if n <= P.INLINE_MAX:
            self._post_or_call("memcpy_htod", stream, dst=dst, size=n, data=bytes(src), stream=sh)
            return
        s = self.session
        with s._lock:
            ch = self._conn()
            half = self._staging_size // 2
            pending: list[int | None] = [None, None]
            for i, off in enumerate(range(0, n, half)):
                slot = i % 2
                if pending[slot] is not None:     # that half is free once its copy has run
                    s._wait(ch, pending[slot], watch=self.name)
                m = min(half, n - off)
                self._staging[slot * half: slot * half + m] = src[off: off + m]
                pending[slot] = s._send(ch, "memcpy_htod", {"session": s.token, "dst": dst + off,
                                                            "size": m, "offset": slot * half,
                                                            "stream": sh})
            for rid in pending:
                if rid is not None:
                    s._wait(ch, rid, watch=self.name)

    def _dtoh(self, dst: memoryview, src: int, stream: Stream | None) -> None:
        n = dst.nbytes
        sh = _stream_handle(stream)
        if n <= P.INLINE_MAX:
            dst[:] = self._call("memcpy_dtoh", src=src, size=n, stream=sh)["data"]
            return
        s = self.session
        with s._lock:
            ch = self._conn()
            half = self._staging_size // 2
            chunks = [(off, min(half, n - off)) for off in range(0, n, half)]

            def ask(i: int) -> int:
                off, m = chunks[i]
                return s._send(ch, "memcpy_dtoh", {"session": s.token, "src": src + off,
                                                   "size": m, "offset": (i % 2) * half,
                                                   "stream": sh})
            rid = ask(0)
            for i, (off, m) in enumerate(chunks):
                s._wait(ch, rid, watch=self.name)
                if i + 1 < len(chunks):
                    rid = ask(i + 1)              # the executor fills the other half meanwhile
                slot = (i % 2) * half
                dst[off: off + m] = self._staging[slot: slot + m]

    def _post_or_call(self, op: str, on_stream: Stream | None, **fields: Any) -> None:
        """Synchronous without a stream (like cuMemcpy), queued on one (like cuMemcpyAsync)."""
        if on_stream is None:
            self._call(op, **fields)
        else:
            self._post(op, **fields)

    # -- modules, streams, events, launches --------------------------------------------------
    def load_module(self, source: str | None = None, *, options: Sequence[str] = (),
                    image: bytes | None = None, kind: str | None = None) -> Module:
        """Load CUDA C `source` (compiled for this device) or a PTX/CUBIN/fatbin `image`."""
        fields: dict[str, Any] = {"options": [str(o) for o in options]}
        if source is not None:
            fields.update(kind=kind or "cuda-c", source=source)
        if image is not None:
            fields.update(kind=kind or "ptx", image=bytes(image))
        if "kind" not in fields:
            raise ValueError("load_module needs source= or image=")
        return Module(self, self._call("module_load", **fields)["module"])

    def create_stream(self, flags: int = 0) -> Stream:
        return Stream(self, self._call("stream_create", flags=flags)["stream"])

    def create_event(self, flags: int = 0) -> Event:
        return Event(self, self._call("event_create", flags=flags)["event"])

    @property
    def default_stream(self) -> Stream:
        return Stream(self, 0)

    def launch(self, kernel: Kernel, grid: Iterable[int], block: Iterable[int],
               args: Sequence[Any] = (), *, stream: Stream | None = None,
               shared_mem: int = 0) -> None:
        """Queue `kernel` on `stream` (default stream if None). Asynchronous, as in CUDA."""
        if kernel.device is not self:
            raise ValueError("kernel belongs to another device")
        if not 0 <= int(shared_mem) <= 1 << 32:
            raise ValueError(f"shared_mem={shared_mem} is not a valid byte count")
        self._post("launch", function=kernel.handle, grid=_dim3(grid), block=_dim3(block),
                   shared=int(shared_mem), stream=_stream_handle(stream),
                   args=encode_args(args, kernel.param_sizes))

    def synchronize(self) -> None:
        self._call("ctx_sync")


def _dim3(d: Iterable[int] | int) -> list[int]:
    dims = [int(d)] if isinstance(d, int) else [int(x) for x in d]
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"a grid or block has 1 to 3 dimensions, got {len(dims)}")
    return dims + [1] * (3 - len(dims))


def _stream_handle(stream: Stream | None) -> int:
    return 0 if stream is None else stream.handle


def encode_args(args: Sequence[Any], sizes: Sequence[int]) -> list[bytes]:
    """Kernel arguments as raw bytes, one string per parameter of the kernel's signature."""
    if len(args) != len(sizes):
        raise ValueError(f"kernel takes {len(sizes)} arguments, got {len(args)}")
    out = []
    for i, (a, n) in enumerate(zip(args, sizes)):
        if isinstance(a, (Buffer, HostBuffer)):
            a = a.ptr
        if isinstance(a, bool):
            a = int(a)
        if isinstance(a, int):
            if not -(1 << (8 * n - 1)) <= a < (1 << (8 * n)):
                raise ValueError(f"argument {i}: {a} does not fit in {n} bytes")
            b = (a & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        elif isinstance(a, float):
            if n not in (4, 8):
                raise ValueError(f"argument {i}: a float for a {n}-byte parameter")
            b = struct.pack("<f" if n == 4 else "<d", a)
        elif isinstance(a, (bytes, bytearray, memoryview)):
            b = bytes(a)
        elif hasattr(a, "tobytes"):         # numpy scalars and 0-d arrays
            b = a.tobytes()
        else:
            try:
                b = bytes(memoryview(a))    # ctypes instances and other buffers
            except TypeError:
                raise ValueError(f"argument {i}: cannot pass a {type(a).__name__}") from None
        if len(b) != n:
            raise ValueError(f"argument {i}: {len(b)} bytes given for a {n}-byte parameter")
        out.append(b)
    return out


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
            self.device._post_or_call("memcpy_dtod", stream, dst=self.ptr + offset, src=src.ptr,
                                      size=n, stream=_stream_handle(stream))
            return
        mv = _as_bytes_view(src)
        self._bounds(offset, mv.nbytes)
        self.device._htod(self.ptr + offset, mv, stream)

    def copy_to(self, dst: Any = None, *, stream: Stream | None = None, offset: int = 0):
        """Copy out into `dst` (a writable buffer, or a new bytearray of the whole buffer)."""
        if dst is None:
            dst = bytearray(self.size - offset)
        if isinstance(dst, (HostBuffer, Buffer)):
            self._bounds(offset, dst.size)
            self.device._post_or_call("memcpy_dtod", stream, dst=dst.ptr, src=self.ptr + offset,
                                      size=dst.size, stream=_stream_handle(stream))
            return dst
        mv = _as_bytes_view(dst, writable=True)
        self._bounds(offset, mv.nbytes)
        self.device._dtoh(mv, self.ptr + offset, stream)
        return dst

    def fill(self, value: int, *, width: int = 1, stream: Stream | None = None) -> None:
        """memset: every `width`-byte element (1, 2 or 4) of the buffer set to `value`."""
        self.device._post_or_call("memset", stream, dst=self.ptr, value=int(value), width=width,
                                  count=self.size // width, stream=_stream_handle(stream))

    def _bounds(self, offset: int, n: int) -> None:
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"{n} bytes at offset {offset} do not fit a {self.size}-byte buffer")

    def _release(self) -> None:
        d = self.device
        if d._ch is not None and not d.session._closed:
            try:
                d._call("mem_free", ptr=self.ptr)
            except KubecashError:
                pass  # the session or executor is gone, and the memory with it


class HostBuffer(_Resource):
    """Pinned host memory mapped into both this process and the executor (zero-copy).

    `view` is this process's memoryview of it; `ptr` is its device address, usable as a
    kernel argument and in copies."""

    def __init__(self, device: Device, ptr: int, size: int, mapping: mmap.mmap):
        self.device, self.ptr, self.size = device, ptr, size
        self._map = mapping
        self.view = memoryview(mapping)

    def _release(self) -> None:
        self.view.release()
        self._map.close()
        d = self.device
        if d._ch is not None and not d.session._closed:
            try:
                d._call("host_free", ptr=self.ptr)
            except KubecashError:
                pass


class Module(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def get_kernel(self, name: str) -> Kernel:
        r = self.device._call("get_function", module=self.handle, name=name)
        return Kernel(self.device, r["function"], name, tuple(r["param_sizes"]))

    def get_global(self, name: str) -> tuple[int, int]:
        """(device address, size) of a __device__ or __constant__ variable."""
        r = self.device._call("get_global", module=self.handle, name=name)
        return r["ptr"], r["size"]

    def _release(self) -> None:
        if self.device._ch is not None and not self.device.session._closed:
            try:
                self.device._call("module_unload", module=self.handle)
            except KubecashError:
                pass


class Kernel:
    def __init__(self, device: Device, handle: int, name: str, param_sizes: tuple[int, ...]):
        self.device, self.handle, self.name, self.param_sizes = device, handle, name, param_sizes

    def __repr__(self) -> str:
        return f"<kubecash Kernel {self.name}{self.param_sizes}>"


class Stream(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def synchronize(self) -> None:
        self.device._call("stream_sync", stream=self.handle)

    def query(self) -> bool:
        """True when all work queued on the stream has completed."""
        return self.device._call("stream_query", stream=self.handle)["ready"]

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for `event`."""
        self.device._post("stream_wait_event", stream=self.handle, event=event.handle)

    def record(self, event: Event | None = None) -> Event:
        event = event or self.device.create_event()
        event.record(self)
        return event

    def _release(self) -> None:
        if self.handle and self.device._ch is not None and not self.device.session._closed:
            try:
                self.device._call("stream_destroy", stream=self.handle)
            except KubecashError:
                pass


class Event(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def record(self, stream: Stream | None = None) -> None:
        self.device._post("event_record", event=self.handle, stream=_stream_handle(stream))

    def synchronize(self) -> None:
        self.device._call("event_sync", event=self.handle)

    def query(self) -> bool:
        return self.device._call("event_query", event=self.handle)["ready"]

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded and complete)."""
        return self.device._call("event_elapsed", start=start.handle, end=self.handle)["ms"]

    def __sub__(self, start: Event) -> float:
        return self.elapsed_ms(start)

    def _release(self) -> None:
        if self.device._ch is not None and not self.device.session._closed:
            try:
                self.device._call("event_destroy", event=self.handle)
            except KubecashError:
                pass
