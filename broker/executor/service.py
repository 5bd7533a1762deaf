"""The executor: construction, the main loop, control messages from the broker and client
request dispatch; composed from the mixins of its sibling modules."""
from __future__ import annotations

import bisect
import collections
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, ProtocolError, map_exceptions
from kubecash.client.limits import Limits

from .. import confine, malloc
from .accounting import Accounting, bound_memory, tenant_dir_error
from .ops_copy import CopyOps
from .ops_memory import MemoryOps
from .ops_module import ModuleOps
from .ops_sync import SyncOps
from .ops_vmm import VmmOps
from .output import OutputCapture
from .runner import Runner
from .state import (
    TRIM_INTERVAL_S,
    EventState,
    QueuedOp,
    SessionState,
    StreamState,
    _err,
    log,
)

SHUTDOWN_LINGER_MS = 500      # how long an exiting executor's last replies may take to go


class Executor(Runner, OutputCapture, Accounting, MemoryOps, VmmOps, CopyOps, ModuleOps, SyncOps):
    """One tenant's context on one device (see the package docstring for its threads)."""

    def __init__(self, tenant: str, device: dict[str, Any], runtime_dir: str, control_fd: int,
                 lease_fd: int, memory_limit: int, threads: int, cache_dir: str,
                 max_message_bytes: int = P.MAX_MESSAGE_BYTES,
                 staging_bytes: int = P.DEFAULT_STAGING_BYTES, limits: Limits | None = None,
                 sandbox: bool = True, compile_helper: Any = None, module_dir: str | None = None,
                 before_backend: Callable[[], None] | None = None):
        """compile_helper, module_dir: see CpuBackend. before_backend runs once the socket is bound
        and before the backend starts any thread of its own (the whole-process filter goes
        on there: kernel threads must inherit it)."""
        self.tenant = tenant
        self.device = device
        self.dev_name = device["name"]
        self.tenant_dir = P.tenant_dir(runtime_dir, tenant)
        self.shm_dir = os.path.join(self.tenant_dir, "shm")
        self.memory_limit = memory_limit
        self.memory_used = 0
        self.max_message_bytes = max_message_bytes
        self.staging_bytes = staging_bytes
        self.limits = limits if limits is not None else Limits()
        self.sessions: dict[bytes, SessionState] = {}
        self.owner: tuple[int, int] | None = None   # uid, gid of the tenant's containers
        self._arena_tried = False               # the CPU device's arena: made at the first attach
        self._handle = 0x1000
        self._lock = threading.Lock()           # memory accounting and the run queue
        self._cv = threading.Condition(self._lock)
        self._ready: collections.deque[SessionState] = collections.deque()
        self._stopping = False
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.device_ns = 0
        self.kernels = 0
        self._stats_sent: tuple[int, int, int] | None = None
        # device lease state: the runner thread's alone
        self._lease: int | None = None
        self._lease_quantum = 0
        self._lease_used = 0
        self._lease_t0: int | None = None
        self._lease_preemptible = False
        self._lease_renewable = False
        self._contended = False
        self._lease_kernels = 0
        self._wanted = False
        self._preempted = False
        self._suspended = False    # the last op run was a kernel preempted mid-grid
        self.compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # The broker's private socketpair: control messages both ways, whole (SEQPACKET).
        # Sends block (the broker reads every pass; reports are rare); receives do not.
        self.ctl = socket.socket(fileno=control_fd)
        try:
            self._bind()
        except (OSError, zmq.ZMQError) as e:     # a full tenant directory, say: the tenant hears why
            err = tenant_dir_error(e, "cannot make the executor's socket in the tenant's directory")
            self._report("fatal", code=int(err.code), error=err.message)
            raise SystemExit(1) from None
        if before_backend is not None:
            before_backend()
        if device["kind"] == "cpu":
            from ..backend_cpu import CpuBackend
            self.backend = CpuBackend(threads, cache_dir, sandbox=sandbox,
                                      on_sandbox_violation=self._sandbox_violation,
                                      compile_helper=compile_helper, module_dir=module_dir)
        else:
            from ..backend_cuda import CudaBackend  # noqa: F401  (GPU backend)
            self.backend = CudaBackend(device, cache_dir)
        self.lease_sock = socket.socket(fileno=lease_fd)
        self._lease_poll = select.poll()
        self._lease_poll.register(lease_fd, select.POLLIN)
        self.runner = threading.Thread(target=self._run, name="runner", daemon=True)

    # -- plumbing ---------------------------------------------------------------------------
    def _new_handle(self) -> int:
        self._handle += 1
        return self._handle

    def _call_in_main(self, fn: Callable[[], None]) -> None:
        self._calls.put(fn)
        os.write(self._wake_w, b"x")

    def _run_calls(self) -> None:
        """Run what other threads handed the main thread (their sends), in order."""
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                call()
            except Exception:
                log.exception("internal error in deferred work")

    def _send(self, ident: bytes, payload: bytes) -> None:
        try:
            self.sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client is gone or not reading; its session ends through the broker

    def _report(self, op: str, **fields: Any) -> None:
        try:
            self.ctl.send(P.notice(op, **fields))
        except OSError:
            self._stopping = True       # the broker is gone

    def _bind(self) -> None:
        path = P.executor_socket_path(os.path.dirname(os.path.dirname(self.tenant_dir)),
                                      self.tenant, self.dev_name)
        # Anything else where shm/ was (the tenant's doing) is replaced: we write only in a
        # directory of our own, found by descriptor, never through a symlink (_shm_dir_fd).
        tdir = os.open(self.tenant_dir, confine.DIR_NOFOLLOW)
        try:
            os.close(confine.open_dir_nofollow(tdir, "shm", create_mode=0o700))
        finally:
            os.close(tdir)
        if os.path.lexists(path):
            os.unlink(path)
        # Made 0666 as it is created (a umask, not a chmod by path after it: the tenant could
        # swap the path in between); the tenant directory (0700, the tenant's) guards it.
        old = os.umask(0o111)
        try:
            self.sock.bind(f"ipc://{path}")
        finally:
            os.umask(old)

    def serve(self) -> None:
        self.runner.start()
        self._report("ready", tenant=self.tenant, device=self.dev_name, pid=os.getpid())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.ctl.fileno(), zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_stats = next_trim = time.monotonic()
        try:
            while not self._stopping:
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                self._run_calls()
                if self.ctl.fileno() in events:
                    self._read_control()
                if self.sock in events:
                    # A bounded batch so control stays responsive; EVENTS rather than the
                    # exception a last non-blocking recv raises (a sync call's cost, #17).
                    for _ in range(256):
                        if not self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            break
                        self._on_client(self.sock.recv_multipart(zmq.NOBLOCK))
                now = time.monotonic()
                if now >= next_stats:
                    next_stats = now + 0.25
                    self._send_stats()
                if now >= next_trim:      # see broker/malloc.py
                    next_trim = now + TRIM_INTERVAL_S
                    malloc.trim()
        finally:
            self._shutdown()

    def _send_stats(self) -> None:
        stats = (self.device_ns, self.kernels, self.memory_used)
        if stats != self._stats_sent:
            self._stats_sent = stats
            self._report("stats", device_ns=stats[0], kernels=stats[1], memory_used=stats[2])

    def _shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.runner.join(timeout=5)
        for s in list(self.sessions.values()):
            self._release(s)
        self.compiler.shutdown(wait=False, cancel_futures=True)
        self.backend.close()
        # What is queued for clients (a fatal error's reply, the printf before it) still goes:
        # LINGER 0 would drop it at close. Bounded, so a client not reading never holds us.
        self.sock.setsockopt(zmq.LINGER, SHUTDOWN_LINGER_MS)
        self.sock.close()
        self.ctl.close()
        self.ctx.term()

    # -- control channel (from the broker) --------------------------------------------------
    def _read_control(self) -> None:
        while not self._stopping:
            try:
                frame = self.ctl.recv(P.CONTROL_MESSAGE_MAX, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:               # the broker closed its end
                self._stopping = True
                return
            self._on_control(frame)

    def _on_control(self, frame: bytes) -> None:
        try:
            handler, msg = P.handler_for(self, P.CONTROL, frame)
        except ProtocolError as e:
            log.error("bad control message: %s", e)
            return
        handler(msg)

    def _on_control_session_add(self, msg: dict) -> None:
        self.sessions.setdefault(msg["session"], SessionState(msg["session"]))
        self._report("session_added", session=msg["session"])

    def _on_control_session_end(self, msg: dict) -> None:
        s = self.sessions.get(msg["session"])
        if s is None or s.closed:
            if s is None:
                self._report("session_ended", session=msg["session"])
            return
        s.closed = True
        token = s.token

        def ended() -> None:
            self.sessions.pop(token, None)
            self._report("session_ended", session=token)

        def cleanup() -> None:         # runs on the runner, after the op in progress
            self._release(s)
            self._call_in_main(ended)
        with self._cv:
            # Queued work is dropped, but not the frees: their handles already left
            # the session's tables, so only running them releases what they hold.
            kept = [op for op in s.queue if op.release]
            s.queue.clear()
            s.queue.extend(kept)
            self._enqueue_locked(s, QueuedOp(cleanup, None, 0, None))

    def _on_control_set_quota(self, msg: dict) -> None:
        self.memory_limit = msg["memory"]
        bound_memory(self.device["kind"], self.memory_limit)

    def _on_control_shutdown(self, msg: dict) -> None:
        self._stopping = True

    # -- client requests -----------------------------------------------------------------
    def _on_client(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                self._send(frames[0], P.error(0, E.CUDA_ERROR_INVALID_VALUE,
                                              f"expected one message frame, got {len(frames) - 1}"))
            return
        ident, frame = frames
        msg: Any = None
        try:
            with map_exceptions(logger=log):   # a bug here must not take the tenant's executor down
                msg = P.unpack(frame, self.max_message_bytes)
                op = P.check(msg, P.EXECUTOR)
                s = self.sessions.get(msg["session"])
                if s is None or s.closed:
                    raise _err(E.CUDA_ERROR_INVALID_CONTEXT,
                               "unknown or ended session (open one through the broker)")
                s.ident = ident                   # where kernel output for this session goes
                result = self._dispatch(op, s, msg, ident)
            if result is not None:
                self._send(ident, P.reply(msg["id"], **result))
        except CudaError as e:
            token = msg.get("session") if isinstance(msg, dict) else None
            s = self.sessions.get(token) if isinstance(token, bytes) else None
            if s is not None and msg.get("async") is True:
                # Nobody waits for an async request's reply: keep the error for the next
                # synchronization, as for any asynchronous failure.
                s.deferred = s.deferred or e
            else:
                self._send(ident, P.error_reply(P.request_id_of(msg), e))

    def _dispatch(self, op: str, s: SessionState, msg: dict, ident: bytes) -> dict | None:
        """Run a checked request's handler (op_<name>): its reply's fields, or None."""
        return getattr(self, P.handler_name(P.message(P.EXECUTOR, op)))(s, msg, ident)

    def op_batch(self, s: SessionState, msg: dict, ident: bytes):
        """The push buffer: each op as if it had come alone (checked, then its handler), in
        order. Nobody waits for them: an op's error is kept for the next synchronization, and
        the ops after it still run, as asynchronous CUDA work does."""
        for i, item in enumerate(msg["ops"]):
            try:
                with map_exceptions(logger=log):
                    op = P.check(item, P.EXECUTOR)
                    if op == "batch" or item.get("async") is not True or item["session"] != s.token:
                        raise _err(E.CUDA_ERROR_INVALID_VALUE,
                                   f"batch op {i} ({op}): a batch holds only asynchronous ops of "
                                   "its own session, no batches")
                    self._dispatch(op, s, item, ident)
            except ProtocolError as e:
                s.deferred = s.deferred or _err(E.CUDA_ERROR_INVALID_VALUE, f"batch op {i}: {e}")
            except CudaError as e:
                s.deferred = s.deferred or e
        if not msg.get("async"):
            return {}                     # sent as a request: answered once queued

    # helpers that look things up in the session's own tables
    def _stream(self, s: SessionState, msg: dict) -> StreamState:
        h = msg.get("stream", 0) or 0
        st = s.streams.get(h)
        if st is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"stream {h:#x} is not one of this session's")
        return st

    def _event(self, s: SessionState, h: int) -> EventState:
        ev = s.events.get(h)
        if ev is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"event {h:#x} is not one of this session's")
        return ev

    def _check_range(self, s: SessionState, ptr: int, n: int, what: str) -> None:
        """[ptr, ptr+n) must lie inside one allocation (device or mapped host) of this session."""
        i = bisect.bisect_right(s.bases, ptr) - 1
        if i >= 0:
            base = s.bases[i]
            if base in s.vmm:
                return self._vmm_check(s, base, ptr, n, what)
            size = s.allocs.get(base)
            if size is None:
                size = s.host[base].size if base in s.host else s.globals[base][0]
            if ptr + n <= base + size:
                return
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{what} range {ptr:#x}+{n} runs past the end of its allocation "
                       f"{base:#x}+{size}")
        raise _err(E.CUDA_ERROR_INVALID_VALUE,
                   f"{what} {ptr:#x} is not in any allocation of this session")

    def _staging_range(self, s: SessionState, offset: int, n: int) -> int:
        if s.staging is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "no staging segment: send 'attach' first")
        addr, size = s.staging
        if offset + n > size:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"staging range {offset}+{n} exceeds the segment of {size} bytes")
        return addr + offset

    def _enqueue(self, s: SessionState, op: QueuedOp) -> None:
        with self._cv:
            self._enqueue_locked(s, op)

    def _enqueue_locked(self, s: SessionState, op: QueuedOp) -> None:
        if op.stream is not None:
            op.stream.pending += 1
        if op.event is not None:
            op.event.pending += 1
        s.queue.append(op)
        if not s.in_ready:
            s.in_ready = True
            self._ready.append(s)
        self._cv.notify()

    def _check_handles(self, s: SessionState, what: str) -> None:
        n, limit = s.handle_count(), self.limits.max_handles_per_session
        if n >= limit:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cannot create {what}: this session holds {n} handles (allocations, "
                       f"streams, events, modules, functions) on {self.dev_name}, the broker's "
                       f"max_handles_per_session is {limit}; free some first")

    def _check_queue(self, s: SessionState, msg: dict) -> None:
        """Bound the work a session may have queued (max_queued_ops_per_session).

        Asynchronous work past the bound is refused (its error is kept for the next
        synchronization, as for any async failure; the client library blocks before it
        gets there, like a full CUDA push buffer). A synchronous request is accepted up to
        twice the bound, so a client can always wait for its queue to drain."""
        limit = self.limits.max_queued_ops_per_session
        n = len(s.queue)
        if n >= (limit if msg.get("async") else 2 * limit):
            raise _err(E.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                       f"{msg['op']} not queued: this session has {n} operations queued on "
                       f"{self.dev_name}, the broker's max_queued_ops_per_session is {limit}; "
                       "synchronize before queueing more")

    def _queue_op(self, s: SessionState, msg: dict, ident: bytes, fn: Callable[[], Any], *,
                  stream: StreamState | None = None, event: EventState | None = None,
                  sync_point: bool = True, kernel: bool = False, device: bool = False,
                  release: bool = False) -> None:
        self._check_queue(s, msg)
        asynchronous = bool(msg.get("async"))
        self._enqueue(s, QueuedOp(fn, None if asynchronous else ident, msg["id"], stream, event,
                            sync_point and not asynchronous, kernel, device or kernel, release))
