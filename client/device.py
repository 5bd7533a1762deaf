"""Device: one device as this tenant sees it, the owner of everything made on it (buffers,
modules, streams, events) and the connection to this tenant's executor for it."""
from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol as P
from .errors import CUresult, error_from_code
from .memory import Buffer, HostBuffer
from .module import Kernel, Module, encode_args
from .stream import Event, Stream, _stream_handle
from .transport import _Channel

if TYPE_CHECKING:
    from .session import Session


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
        # A CPU device's memory mapped here (the executor's arena): synchronous copies are one
        # memcpy on this process's CPU, after a sync request says the stream is idle.
        self._arena: memoryview | None = None
        self._arena_map: mmap.mmap | None = None
        self._arena_base = 0
        self._live: dict[int, int] = {}    # allocations this Device made: ptr -> size
        self._live_bases: list[int] = []   # sorted keys of _live
        self._queue_window = 0       # async requests allowed in flight (from the executor)
        self._posted = 0             # async requests sent since the last context sync
        # Whether async work may still be queued: every synchronous request is answered once
        # it has run, so without async work since the last full sync nothing is pending.
        self._unsynced = False

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
            self._ch = _Channel(s._ctx, f"ipc://{s.tenant_dir}/{r['address']}", P.EXECUTOR)
            a = s._wait(self._ch, s._send(self._ch, "attach", {"session": s.token}),
                        watch=self.name, timeout=60)
            self.memory_limit = a["memory_limit"]
            self._ch.max_bytes = a["max_message_bytes"]       # the reply is checked: all there
            # The executor queues at most max_queued_ops per session: like a full CUDA push
            # buffer, the client blocks (a context sync) well before that.
            self._queue_window = max(1, a["max_queued_ops"] // 2)
            self._ch.batch_session = s.token       # attached: async work goes in batches
            self._posted = 0
            self._unsynced = False
            if a["staging"]:
                path = os.path.join(s.tenant_dir, "shm", a["staging"])
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    self._staging = mmap.mmap(fd, a["staging_size"])
                finally:
                    os.close(fd)
                    os.unlink(path)   # both sides have it mapped; nothing to leak on disk
                self._staging_size = a["staging_size"]
            if a["arena"] and "/" not in a["arena"]:
                self._map_arena(os.path.join(s.tenant_dir, "shm", a["arena"]), a["arena_size"],
                                a["arena_base"])
        return self._ch

    def _map_arena(self, path: str, size: int, base: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0),
                              mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except (OSError, ValueError, OverflowError):
            return                        # copies go through the executor, as on a GPU
        self._arena_map, self._arena, self._arena_base = m, memoryview(m), base

    def _arena_view(self, ptr: int, n: int) -> memoryview | None:
        """The mapped bytes of [ptr, ptr+n) when they lie in one live allocation this Device made
        in the arena (else None: the executor checks and copies, as for any other range)."""
        if self._arena is None:
            return None
        i = bisect.bisect_right(self._live_bases, ptr) - 1
        if i < 0:
            return None
        base = self._live_bases[i]
        if ptr + n > base + self._live[base]:
            return None
        off = ptr - self._arena_base
        if off < 0 or off + n > len(self._arena):
            return None                   # a private mapping (arena full): not shared
        return self._arena[off: off + n]

    def _forget(self, ptr: object) -> None:
        if isinstance(ptr, int) and self._live.pop(ptr, None) is not None:
            self._live_bases.remove(ptr)

    def _disconnect(self) -> None:
        self._live.clear()
        self._live_bases.clear()
        if self._arena is not None:
            self._arena.release()
            self._arena_map.close()
            self._arena = self._arena_map = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._ch is not None:
            try:
                self._ch.flush()              # posted work still runs (mem_free among it)
            except zmq.ZMQError:
                pass
            self._ch.close()
            self._ch = None

    # -- requests: the executor protocol's ops (see kubecash.client.protocol) ----------------
    def _usable_channel(self) -> _Channel:
        """The executor channel, once the session is open and this device's context not lost
        (the session's lock is held)."""
        s = self.session
        s._check_open()
        if self.name in s._failed:
            raise s._failed[self.name]
        return self._conn()

    def _has_staging(self) -> bool:
        """Whether this context has a staging segment (an executor gives none to a session
        whose memory quota is too small to hold one: its copies go inline)."""
        with self.session._lock:
            self._usable_channel()
            return self._staging is not None

    def request(self, op: str, **fields: Any) -> dict:
        """Send request `op` with `fields` to this tenant's executor for the device and wait for
        its reply (a dict); an error reply raises its CudaError (kubecash.client.errors). The
        session token is added. The brokered shim and tests use it for ops this API does not
        wrap; a context sync (op "ctx_sync") also resets the back-pressure count of submit()."""
        s = self.session
        with s._lock:
            ch = self._usable_channel()
            if op == "ctx_sync":
                self._posted = 0
            elif op == "mem_free":            # no direct copies to it from here on
                self._forget(fields.get("ptr"))
            r = s._wait(ch, s._send(ch, op, {"session": s.token, **fields}), watch=self.name)
            if op == "ctx_sync" or (op == "stream_sync" and not fields.get("stream")):
                self._unsynced = False    # everything queued before it has run
            elif op == "mem_alloc":             # (by Buffer or the shim): direct copies may use it
                self._live[r["ptr"]] = int(fields["size"])
                bisect.insort(self._live_bases, r["ptr"])
            return r

    def submit(self, op: str, **fields: Any) -> None:
        """Send an asynchronous request and return at once, with no reply: its error surfaces at
        the next synchronization, as CUDA reports asynchronous errors. Every so many (half the
        executor's max_queued_ops) it waits for a context sync, like a full push buffer."""
        s = self.session
        with s._lock:
            ch = self._usable_channel()
            s._send(ch, op, {"session": s.token, **fields}, asynchronous=True)
            self._unsynced = True
            self._posted += 1
            if self._posted >= self._queue_window:
                # Back-pressure: wait for the queue to drain. An error of earlier async
                # work surfaces here, as CUDA may report it from any later call.
                self._posted = 0
                s._wait(ch, s._send(ch, "ctx_sync", {"session": s.token}), watch=self.name)
                self._unsynced = False

    # -- memory ---------------------------------------------------------------------------
    def allocate(self, size: int) -> Buffer:
        return Buffer(self, self.request("mem_alloc", size=int(size))["ptr"], int(size))

    def allocate_host(self, size: int) -> HostBuffer:
        """Pinned, device-mapped host memory shared with the executor (zero-copy)."""
        r = self.request("host_alloc", size=int(size))
        path = os.path.join(self.session.tenant_dir, "shm", r["path"])
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                m = mmap.mmap(fd, int(size))
            finally:
                os.close(fd)
        except OSError:
            self.request("host_free", ptr=r["ptr"])
            raise
        self.request("host_mapped", ptr=r["ptr"])
        return HostBuffer(self, r["ptr"], int(size), m)

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of this tenant's quota on the device."""
        r = self.request("mem_info")
        return r["free"], r["total"]

    def write(self, dst_ptr: int, src: memoryview, stream: Stream | None = None) -> None:
        """Copy host bytes `src` (a one-dimensional byte memoryview) to device address `dst_ptr`.

        Without a stream it returns once the copy is done (like cuMemcpyHtoD); on one, a small
        copy is queued (like cuMemcpyHtoDAsync) and a large one, staged through the shared
        segment, still returns when done. Buffer.copy_from takes any buffer."""
        n = src.nbytes
        sh = _stream_handle(stream)
        src = src if src.format == "B" and src.ndim == 1 else src.cast("B")
        if self._direct(dst_ptr, n, stream, lambda view: view.__setitem__(slice(None), src)):
            return
        if n <= P.INLINE_MAX or not self._has_staging():
            for off in range(0, max(n, 1), P.INLINE_MAX):  # inline, in pieces if need be
                m = min(P.INLINE_MAX, n - off)
                self.request_or_submit("memcpy_htod", stream, dst=dst_ptr + off, size=m,
                                       data=bytes(src[off: off + m]), stream=sh)
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
                pending[slot] = s._send(ch, "memcpy_htod", {"session": s.token, "dst": dst_ptr + off,
                                                            "size": m, "offset": slot * half,
                                                            "stream": sh})
            for rid in pending:
                if rid is not None:
                    s._wait(ch, rid, watch=self.name)

    def read(self, dst: memoryview, src_ptr: int, stream: Stream | None = None) -> None:
        """Copy device memory at `src_ptr` into host bytes `dst` (a writable one-dimensional byte
        memoryview; dst.nbytes bytes). Returns with `dst` filled, after earlier work on `stream`
        (the default stream if None). Buffer.copy_to takes any writable buffer."""
        n = dst.nbytes
        sh = _stream_handle(stream)
        if self._direct(src_ptr, n, stream, lambda view: dst.__setitem__(slice(None), view)):
            return
        if n <= P.INLINE_MAX or not self._has_staging():
            for off in range(0, max(n, 1), P.INLINE_MAX):
                m = min(P.INLINE_MAX, n - off)
                dst[off: off + m] = self.request("memcpy_dtoh", src=src_ptr + off, size=m, stream=sh)["data"]
            return
        s = self.session
        with s._lock:
            ch = self._conn()
            half = self._staging_size // 2
            chunks = [(off, min(half, n - off)) for off in range(0, n, half)]

            def ask(i: int) -> int:
                off, m = chunks[i]
                return s._send(ch, "memcpy_dtoh", {"session": s.token, "src": src_ptr + off,
                                                   "size": m, "offset": (i % 2) * half,
                                                   "stream": sh})
            rid = ask(0)
            for i, (off, m) in enumerate(chunks):
                s._wait(ch, rid, watch=self.name)
                if i + 1 < len(chunks):
                    rid = ask(i + 1)              # the executor fills the other half meanwhile
                slot = (i % 2) * half
                dst[off: off + m] = self._staging[slot: slot + m]

    def _direct(self, ptr: int, n: int, stream: Stream | None, copy) -> bool:
        """A synchronous copy straight to or from the mapped arena: once the stream is idle (a
        stream_sync, which also reports earlier async errors; none needed when no async work
        was sent since the last full sync), `copy(view)` is one memcpy run by this process, on
        its own CPU. False where it does not apply (no arena, a range this Device did not
        allocate, a small copy on a stream: queued inline, in stream order)."""
        if stream is not None and n <= P.INLINE_MAX:
            return False
        s = self.session
        with s._lock:                     # nothing else of this session is queued meanwhile
            self._usable_channel()
            view = self._arena_view(ptr, n)
            if view is None:
                return False
            try:
                if self._unsynced:
                    self.request("stream_sync", stream=_stream_handle(stream))
                copy(view)
            finally:
                view.release()
        return True

    def request_or_submit(self, op: str, on_stream: Stream | None, **fields: Any) -> None:
        """request() without a stream (like cuMemcpy), submit() on one (like cuMemcpyAsync).
        `on_stream` only chooses; the op's own "stream" field names the stream to the executor."""
        if on_stream is None:
            self.request(op, **fields)
        else:
            self.submit(op, **fields)

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
        return Module(self, self.request("module_load", **fields)["module"])

    def create_stream(self, flags: int = 0) -> Stream:
        return Stream(self, self.request("stream_create", flags=flags)["stream"])

    def create_event(self, flags: int = 0) -> Event:
        return Event(self, self.request("event_create", flags=flags)["event"])

    @property
    def default_stream(self) -> Stream:
        return Stream(self, 0)

    def launch(self, kernel: Kernel, grid: Iterable[int], block: Iterable[int],
               args: Sequence[Any] = (), *, stream: Stream | None = None,
               shared_mem: int = 0, cooperative: bool = False) -> None:
        """Queue `kernel` on `stream` (default stream if None). Asynchronous, as in CUDA.
        `cooperative`: every block resident at once, as cuLaunchCooperativeKernel (grid-wide
        barriers); a grid larger than the device holds is CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE."""
        if kernel.device is not self:
            raise ValueError("kernel belongs to another device")
        if not 0 <= int(shared_mem) <= 1 << 32:
            raise ValueError(f"shared_mem={shared_mem} is not a valid byte count")
        extra = {"cooperative": True} if cooperative else {}
        self.submit("launch", function=kernel.handle, grid=_dim3(grid), block=_dim3(block),
                   shared=int(shared_mem), stream=_stream_handle(stream),
                   args=encode_args(args, kernel.param_sizes), **extra)

    def synchronize(self) -> None:
        self.request("ctx_sync")


def _dim3(d: Iterable[int] | int) -> list[int]:
    dims = [int(d)] if isinstance(d, int) else [int(x) for x in d]
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"a grid or block has 1 to 3 dimensions, got {len(dims)}")
    return dims + [1] * (3 - len(dims))
