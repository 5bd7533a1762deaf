"""Executor: the data plane. One process per (tenant, device), started and reaped by the broker.

It owns the tenant's context on the device: allocations, modules, streams, events, the
shared-memory segments it shares with the tenant's clients. Clients talk to it directly on
`<tenant dir>/<device>.sock`; the broker talks to it on two socketpairs it inherits (control
messages, and device leases), which nothing else can reach.

Threads
- main: the only thread touching the client socket and session tables; validates each request,
  answers the immediate ones (alloc, module load bookkeeping, queries) and queues the rest.
- runner: executes queued work in per-session FIFO order, one operation at a time, round
  robin across sessions. Executing each session's requests in submission order is a valid
  schedule for every CUDA stream semantics (stream order, legacy default stream, events
  recorded before a wait), so streams only need to track what is pending on them.
- compiler: module builds (seconds of g++) run off the main thread.
Work done off the main thread comes back as callables on `self._calls`, with a pipe to wake
the main loop.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import dataclasses
import logging
import os
import queue
import resource
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import STICKY_CODES, CudaError, CUresult, ProtocolError, error_from_code

from . import malloc

log = logging.getLogger("kubecash.executor")

E = CUresult
SUSPENDED = object()     # what a preempted kernel's op returns: run the rest later
MAX_GRID = (2**31 - 1, 65535, 65535)
TRIM_INTERVAL_S = 5.0    # malloc.trim() takes under a ms; freed memory goes back within 5 s
MAX_BLOCK = (1024, 1024, 64)
# Per-session bounds (the broker passes its [broker] settings; these are the defaults).
DEFAULT_LIMITS = {"max_handles_per_session": 65536, "max_modules_per_session": 256,
                  "max_module_bytes": 8 << 20, "max_queued_ops_per_session": 4096}


def _err(code: int, msg: str, log: str = "") -> CudaError:
    return error_from_code(code, msg, log=log)


@dataclasses.dataclass
class Stream:
    handle: int
    pending: int = 0
    waiters: list = dataclasses.field(default_factory=list)   # (session, ident, request id)


@dataclasses.dataclass
class Event:
    handle: int
    pending: int = 0
    time_ns: int | None = None
    waiters: list = dataclasses.field(default_factory=list)   # (session, ident, request id)


@dataclasses.dataclass
class HostAlloc:
    size: int
    path: str


@dataclasses.dataclass
class Op:
    fn: Callable[[], dict[str, Any] | None]
    ident: bytes | None          # reply to this peer, or None for an async op
    req_id: int
    stream: Stream | None
    event: Event | None = None
    sync_point: bool = False     # its reply carries errors kept from earlier async work
    kernel: bool = False
    device: bool = False         # uses the device: runs only under the broker's lease
    release: bool = False        # frees something: still runs if the session ends first


class Session:
    def __init__(self, token: bytes):
        self.token = token
        self.allocs: dict[int, int] = {}        # device pointer -> size
        self.bases: list[int] = []              # sorted keys of allocs + host, for range checks
        self.host: dict[int, HostAlloc] = {}    # mapped host memory, executor address -> alloc
        self.globals: dict[int, tuple[int, int]] = {}   # module variables: address -> (size, module)
        self.modules: dict[int, Any] = {}
        self.functions: dict[int, tuple[int, Any, tuple[int, ...]]] = {}
        self.streams: dict[int, Stream] = {0: Stream(0)}
        self.events: dict[int, Event] = {}
        self.queue: collections.deque[Op] = collections.deque()
        self.deferred: CudaError | None = None  # first error of an async op, until a sync point
        self.staging: tuple[int, int] | None = None   # (executor address, size)
        self.staging_path: str | None = None    # its file; the client unlinks it once mapped
        self.closed = False
        self.in_ready = False                   # listed in the runner's round robin
        self.ident: bytes | None = None         # the client's socket, for kernel output
        self.building = 0                       # module loads submitted, not yet registered
        self.fn_names: dict[tuple[int, str], int] = {}   # (module, name) -> function handle

    def handle_count(self) -> int:
        """Everything the session holds a handle to (what max_handles_per_session bounds)."""
        return (len(self.allocs) + len(self.host) + len(self.streams) - 1 + len(self.events)
                + len(self.modules) + self.building + len(self.functions))


class Executor:
    def __init__(self, tenant: str, device: dict[str, Any], runtime_dir: str, control_fd: int,
                 lease_fd: int, memory_limit: int, threads: int, cache_dir: str,
                 max_message_bytes: int = P.MAX_MESSAGE_BYTES,
                 staging_bytes: int = P.DEFAULT_STAGING_BYTES, limits: dict | None = None,
                 sandbox: bool = True):
        self.tenant = tenant
        self.device = device
        self.dev_name = device["name"]
        self.tenant_dir = P.tenant_dir(runtime_dir, tenant)
        self.shm_dir = os.path.join(self.tenant_dir, "shm")
        self.memory_limit = memory_limit
        self.memory_used = 0
        self.max_message_bytes = max_message_bytes
        self.staging_bytes = staging_bytes
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.sessions: dict[bytes, Session] = {}
        self.owner: tuple[int, int] | None = None   # uid, gid of the tenant's containers
        self._handle = 0x1000
        self._lock = threading.Lock()           # memory accounting and the run queue
        self._cv = threading.Condition(self._lock)
        self._ready: collections.deque[Session] = collections.deque()
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
        self._lease_kernels = 0
        self._wanted = False
        self._preempted = False
        self._suspended = False    # the last op run was a kernel preempted mid-grid
        if device["kind"] == "cpu":
            from .backend_cpu import CpuBackend
            self.backend = CpuBackend(threads, cache_dir, sandbox=sandbox,
                                      on_sandbox_violation=self._sandbox_violation)
        else:
            from .backend_cuda import CudaBackend  # noqa: F401  (GPU backend)
            self.backend = CudaBackend(device, cache_dir)
        self.compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # The broker's private socketpair: control messages both ways, whole (SEQPACKET).
        # Sends block (the broker reads every pass; reports are rare); receives do not.
        self.ctl = socket.socket(fileno=control_fd)
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

    def _send(self, ident: bytes, payload: bytes) -> None:
        try:
            self.sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client is gone or not reading; its session ends through the broker

    def _report(self, op: str, **fields: Any) -> None:
        try:
            self.ctl.send(P.pack({"v": P.VERSION, "op": op, **fields}))
        except OSError:
            self._stopping = True       # the broker is gone

    def serve(self) -> None:
        path = P.executor_socket_path(os.path.dirname(os.path.dirname(self.tenant_dir)),
                                      self.tenant, self.dev_name)
        os.makedirs(self.shm_dir, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        self.sock.bind(f"ipc://{path}")
        os.chmod(path, 0o666)        # the tenant directory (0700, the tenant's uid) guards it
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
                while True:
                    try:
                        call = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        call()
                    except Exception:
                        log.exception("internal error in deferred work")
                if self.ctl.fileno() in events:
                    self._read_control()
                if self.sock in events:
                    for _ in range(256):     # bounded batch so control stays responsive
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_client(frames)
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
            op, msg = P.decode(frame, P.CONTROL_OPS)
        except ProtocolError as e:
            log.error("bad control message: %s", e)
            return
        if op == "session_add":
            self.sessions.setdefault(msg["session"], Session(msg["session"]))
            self._report("session_added", session=msg["session"])
        elif op == "session_end":
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
                self._enqueue_locked(s, Op(cleanup, None, 0, None))
        elif op == "set_quota":
            self.memory_limit = msg["memory"]
            bound_memory(self.device["kind"], self.memory_limit)
        elif op == "shutdown":
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
            msg = P.unpack(frame, self.max_message_bytes)
            op = P.check_request(msg, P.EXECUTOR_OPS)
            s = self.sessions.get(msg["session"])
            if s is None or s.closed:
                raise _err(E.CUDA_ERROR_INVALID_CONTEXT,
                           "unknown or ended session (open one through the broker)")
            s.ident = ident                   # where kernel output for this session goes
            result = getattr(self, "op_" + op)(s, msg, ident)
            if result is not None:
                self._send(ident, P.reply(msg["id"], **result))
        except ProtocolError as e:
            token = msg.get("session") if isinstance(msg, dict) else None
            s = self.sessions.get(token) if isinstance(token, bytes) else None
            if s is not None and msg.get("async") is True:
                # Nobody waits for an async request's reply: keep the error for the next
                # synchronization, as for any asynchronous failure.
                s.deferred = s.deferred or _err(P.PROTOCOL_ERROR_CODE, str(e))
            else:
                self._send(ident, P.error(P.request_id_of(msg), P.PROTOCOL_ERROR_CODE, str(e)))
        except CudaError as e:
            if isinstance(msg, dict) and msg.get("async") and msg.get("session") in self.sessions:
                s = self.sessions[msg["session"]]
                s.deferred = s.deferred or e
            else:
                self._send(ident, P.error(P.request_id_of(msg), e.code, e.message, e.log))
        except Exception as e:  # a bug here must not take the tenant's executor down
            log.exception("internal error handling a request")
            self._send(ident, P.error(P.request_id_of(msg), E.CUDA_ERROR_UNKNOWN,
                                      f"internal error: {type(e).__name__}: {e}"))

    # helpers that look things up in the session's own tables
    def _stream(self, s: Session, msg: dict) -> Stream:
        h = msg.get("stream", 0) or 0
        st = s.streams.get(h)
        if st is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"stream {h:#x} is not one of this session's")
        return st

    def _event(self, s: Session, h: int) -> Event:
        ev = s.events.get(h)
        if ev is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"event {h:#x} is not one of this session's")
        return ev

    def _check_range(self, s: Session, ptr: int, n: int, what: str) -> None:
        """[ptr, ptr+n) must lie inside one allocation (device or mapped host) of this session."""
        i = bisect.bisect_right(s.bases, ptr) - 1
        if i >= 0:
            base = s.bases[i]
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

    def _staging_range(self, s: Session, offset: int, n: int) -> int:
        if s.staging is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "no staging segment: send 'attach' first")
        addr, size = s.staging
        if offset + n > size:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"staging range {offset}+{n} exceeds the segment of {size} bytes")
        return addr + offset

    def _enqueue(self, s: Session, op: Op) -> None:
        with self._cv:
            self._enqueue_locked(s, op)

    def _enqueue_locked(self, s: Session, op: Op) -> None:
        if op.stream is not None:
            op.stream.pending += 1
        if op.event is not None:
            op.event.pending += 1
        s.queue.append(op)
        if not s.in_ready:
            s.in_ready = True
            self._ready.append(s)
        self._cv.notify()

    def _check_handles(self, s: Session, what: str) -> None:
        n, limit = s.handle_count(), self.limits["max_handles_per_session"]
        if n >= limit:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cannot create {what}: this session holds {n} handles (allocations, "
                       f"streams, events, modules, functions) on {self.dev_name}, the broker's "
                       f"max_handles_per_session is {limit}; free some first")

    def _check_queue(self, s: Session, msg: dict) -> None:
        """Bound the work a session may have queued (max_queued_ops_per_session).

        Asynchronous work past the bound is refused (its error is kept for the next
        synchronization, as for any async failure; the client library blocks before it
        gets there, like a full CUDA push buffer). A synchronous request is accepted up to
        twice the bound, so a client can always wait for its queue to drain."""
        limit = self.limits["max_queued_ops_per_session"]
        n = len(s.queue)
        if n >= (limit if msg.get("async") else 2 * limit):
            raise _err(E.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                       f"{msg['op']} not queued: this session has {n} operations queued on "
                       f"{self.dev_name}, the broker's max_queued_ops_per_session is {limit}; "
                       "synchronize before queueing more")

    def _queue_op(self, s: Session, msg: dict, ident: bytes, fn: Callable[[], Any], *,
                  stream: Stream | None = None, event: Event | None = None,
                  sync_point: bool = True, kernel: bool = False, device: bool = False,
                  release: bool = False) -> None:
        self._check_queue(s, msg)
        asynchronous = bool(msg.get("async"))
        self._enqueue(s, Op(fn, None if asynchronous else ident, msg["id"], stream, event,
                            sync_point and not asynchronous, kernel, device or kernel, release))

    # -- the runner and the device lease ------------------------------------------------
    # Work that uses the device runs only while this executor holds the broker's lease for
    # it. The runner asks for the lease when such work reaches the head of a queue, runs
    # work until the quantum is spent, it is preempted, or nothing is left, then gives the
    # lease back reporting the device time it measured. Lease traffic goes over a private
    # socketpair the broker made at spawn time, read and written by the runner alone: a
    # hand-over is two direct process wake-ups (ZeroMQ's I/O threads would add four more).
    def _run(self) -> None:
        try:
            self._run_loop(self.lease_sock)
        finally:
            self.lease_sock.close()

    def _run_loop(self, ls: socket.socket) -> None:
        while True:
            s: Session | None = None
            op: Op | None = None
            with self._cv:
                while True:
                    if self._stopping:
                        return
                    if not self._ready:
                        if self._lease is None and not self._wanted:
                            self._cv.wait()      # idle, and no grant can be on its way
                            continue
                        break
                    s = self._ready[0]
                    if not s.queue:
                        self._ready.popleft()
                        s.in_ready = False
                        s = None
                        continue
                    # The first session (round robin) whose next op can run now: one
                    # waiting for the device must not hold up others' frees, syncs, cleanup.
                    on_device = self._lease is not None and not self._preempted
                    pick = next((c for c in self._ready if c.queue and
                                 (on_device or not c.queue[0].device)), None)
                    if pick is None:
                        break                    # s needs the device
                    s = pick
                    op = s.queue.popleft()
                    self._ready.remove(s)
                    if s.queue:
                        self._ready.append(s)
                    else:
                        s.in_ready = False
                    break
            if op is None:
                if self._lease is not None:      # nothing to run, or asked to stop
                    self._give_back(ls, more=s is not None)
                    continue
                if s is not None and not self._wanted:
                    self._wanted = True
                    ls.send(P.pack({"v": P.VERSION, "op": "want"}))
                self._poll_lease(ls, 100)
                continue
            if op.device and self._lease is not None and self._lease_t0 is None:
                self._lease_t0 = time.perf_counter_ns()
            self._execute(s, op)
            if op.device and self._lease is not None:
                # The device is charged for the whole time it is held, from the start of the
                # lease's first work to the end of its last (what runs between is the tenant's).
                self._lease_used = time.perf_counter_ns() - self._lease_t0
                self._lease_kernels += op.kernel and not self._suspended
                self._poll_lease(ls, 0)          # a preemption may have come meanwhile
                if self._lease_used >= self._lease_quantum or self._preempted:
                    with self._cv:
                        more = bool(self._ready)
                    self._give_back(ls, more=more)

    def _poll_lease(self, ls: socket.socket, timeout_ms: int) -> None:
        """Take grants and preemptions from the broker (runner thread only)."""
        while self._lease_poll.poll(timeout_ms):
            timeout_ms = 0
            frame = ls.recv(65536)
            if not frame:                   # the broker is gone: so is our reason to run
                self._stopping = True
                return
            try:
                op, msg = P.decode(frame, P.CONTROL_OPS)
            except ProtocolError as e:
                log.error("bad lease message: %s", e)
                continue
            if op == "grant":
                self._lease, self._lease_quantum = msg["lease"], msg["quantum_ns"]
                self._lease_preemptible = msg.get("preemptible", False)
                self._lease_used = self._lease_kernels = 0
                self._lease_t0 = None
                self._preempted = self._wanted = False
            elif op == "preempt" and msg["lease"] == self._lease:
                self._preempted = True

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
        sys.stdout = open(os.devnull, "w")   # Python-level prints of ours never mix in
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

    def _forward_output(self, s: Session) -> None:
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

    def _maybe_fatal(self, error: CudaError | None) -> None:
        """A context-fatal ("sticky") device error ends this executor: its context is
        unusable. The broker hears why and tells this tenant's sessions; others go on."""
        if error is None or error.code not in STICKY_CODES:
            return

        def die() -> None:
            log.error("context-fatal error, exiting: %s", error)
            self._report("fatal", code=error.code, error=error.message[:500])
            self._stopping = True
        self._call_in_main(die)

    def _sandbox_violation(self, message: str, nr: int, name: str) -> None:
        """A kernel made a system call the CPU backend's sandbox refused (runs on the
        sandbox's watcher thread; the offending worker is parked in its SIGSYS handler).
        Tell the broker why, then return: the sandbox ends this process by SIGSYS."""
        sent = threading.Event()

        def report() -> None:
            log.error("%s", message)
            self._report("fatal", code=int(E.CUDA_ERROR_LAUNCH_FAILED), error=message[:1000])
            sent.set()
        self._call_in_main(report)
        sent.wait(2.0)
        time.sleep(0.3)      # let ZeroMQ's I/O thread deliver it before the process ends

    def _should_yield(self) -> bool:
        """Between slices of a preemptible kernel: has the broker asked for the device?"""
        self._poll_lease(self.lease_sock, 0)
        return self._preempted

    def _give_back(self, ls: socket.socket, more: bool) -> None:
        msg = {"v": P.VERSION, "op": "release", "lease": self._lease,
               "used_ns": self._lease_used, "kernels": self._lease_kernels, "more": more}
        if self._suspended:
            msg["suspended"] = True
        ls.send(P.pack(msg))
        self._lease = None
        self._wanted = more           # the broker counts a release with more work as a want

    def _execute(self, s: Session, op: Op) -> int:
        t0 = time.perf_counter_ns()
        result: dict[str, Any] | None = None
        error: CudaError | None = None
        self._suspended = False
        try:
            result = op.fn() or {}
            if result is SUSPENDED:           # preempted mid-kernel: it stays at the head
                self._suspended = True
                with self._cv:
                    if s.closed:              # its session ended meanwhile: drop the rest
                        return time.perf_counter_ns() - t0
                    s.queue.appendleft(op)
                    if s.in_ready:
                        self._ready.remove(s)
                    s.in_ready = True
                    self._ready.appendleft(s)
                return time.perf_counter_ns() - t0
        except CudaError as e:
            error = e
        except Exception as e:
            log.exception("internal error executing an operation")
            error = _err(E.CUDA_ERROR_UNKNOWN, f"internal error: {type(e).__name__}: {e}")
        dt = time.perf_counter_ns() - t0
        if op.kernel:
            self._forward_output(s)
        with self._cv:
            if op.device:
                self.device_ns += dt
            if op.kernel and error is None:
                self.kernels += 1
            if op.ident is None and error is not None and s.deferred is None:
                s.deferred = error            # before waiters answer: their sync reports it
            woken = []
            for obj in (op.stream, op.event):
                if obj is not None:
                    obj.pending -= 1
                    if obj.pending == 0 and obj.waiters:
                        woken += [(ident, self._sync_payload_locked(ws, rid))
                                  for ws, ident, rid in obj.waiters]
                        obj.waiters.clear()
            if woken:
                self._call_in_main(lambda: [self._send(i, p) for i, p in woken])
            if op.ident is None:
                self._maybe_fatal(error)
                return dt
            if op.sync_point and s.deferred is not None and error is None:
                error, s.deferred = s.deferred, None
        payload = (P.error(op.req_id, error.code, error.message, error.log) if error
                   else P.reply(op.req_id, **result))
        ident = op.ident
        self._call_in_main(lambda: self._send(ident, payload))
        self._maybe_fatal(error)
        return dt

    # -- resources ----------------------------------------------------------------------
    def _release(self, s: Session) -> None:
        """Free everything a session holds (runs on the runner or at shutdown)."""
        for ptr, size in list(s.allocs.items()):
            self.backend.free(ptr, size)
            with self._lock:
                self.memory_used -= size
        s.allocs.clear()
        s.globals.clear()
        for ptr, h in list(s.host.items()):
            self._drop_host(ptr, h)
        s.host.clear()
        s.bases.clear()
        if s.staging:
            self.backend.unmap(*s.staging)
            s.staging = None
        if s.staging_path:       # a client that died before unlinking it leaves the name
            try:
                os.unlink(s.staging_path)
            except FileNotFoundError:
                pass
            s.staging_path = None
        for m in s.modules.values():
            self.backend.unload_module(m)
        s.modules.clear()
        s.functions.clear()

    def _drop_host(self, ptr: int, h: HostAlloc) -> None:
        self.backend.unmap(ptr, h.size)
        try:
            os.unlink(h.path)
        except FileNotFoundError:
            pass
        if self.backend.kind == "cpu":       # on a CPU device host memory is device memory
            with self._lock:
                self.memory_used -= h.size

    def _charge(self, size: int, what: str) -> None:
        with self._lock:
            if self.memory_used + size > self.memory_limit:
                raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                           f"{what} of {size} bytes exceeds tenant '{self.tenant}' memory quota "
                           f"on {self.dev_name}: limit {self.memory_limit} bytes, "
                           f"{self.memory_used} in use")
            self.memory_used += size

    def _uncharge(self, size: int) -> None:
        with self._lock:
            self.memory_used -= size

    def _shm_file(self, kind: str, size: int) -> tuple[str, int]:
        name = f"{self.dev_name}-{secrets.token_hex(8)}.{kind}"
        path = os.path.join(self.shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if self.owner is not None:     # the tenant's containers map it as their uid
                os.fchown(fd, *self.owner)
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return path, fd

    # -- operations: each op_<name> handles the request of that name ----------------------
    def op_attach(self, s: Session, msg: dict, ident: bytes):
        if s.staging is None:
            path, fd = self._shm_file("staging", self.staging_bytes)
            s.staging_path = path
            try:
                s.staging = (self.backend.map_file(fd, self.staging_bytes), self.staging_bytes)
            finally:
                os.close(fd)
        else:
            path = ""
        return {"staging": os.path.basename(path), "staging_size": self.staging_bytes,
                "memory_limit": self.memory_limit, "device": self.device,
                "max_queued_ops": self.limits["max_queued_ops_per_session"],
                "max_message_bytes": self.max_message_bytes}

    def op_mem_alloc(self, s: Session, msg: dict, ident: bytes):
        size = msg["size"]
        if size == 0:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "cannot allocate 0 bytes")
        self._check_handles(s, "an allocation")
        self._charge(size, "allocation")
        try:
            ptr = self.backend.alloc(size)
        except CudaError:
            self._uncharge(size)
            raise
        s.allocs[ptr] = size
        bisect.insort(s.bases, ptr)
        return {"ptr": ptr}

    def op_mem_free(self, s: Session, msg: dict, ident: bytes):
        ptr = msg["ptr"]
        self._check_queue(s, msg)          # before the tables change: a refusal changes nothing
        size = s.allocs.pop(ptr, None)
        if size is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{ptr:#x} is not the start of an allocation of this session")
        s.bases.remove(ptr)

        def free() -> None:               # after the work queued before it has run
            self.backend.free(ptr, size)
            self._uncharge(size)
        self._queue_op(s, msg, ident, free, release=True)

    def op_mem_info(self, s: Session, msg: dict, ident: bytes):
        with self._lock:
            return {"free": max(0, self.memory_limit - self.memory_used),
                    "total": self.memory_limit}

    def op_host_alloc(self, s: Session, msg: dict, ident: bytes):
        size = msg["size"]
        if size == 0:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "cannot allocate 0 bytes")
        self._check_handles(s, "a mapped host allocation")
        counts = self.backend.kind == "cpu"
        if counts:
            self._charge(size, "mapped host allocation")
        path = None
        try:
            path, fd = self._shm_file("host", size)
            try:
                ptr = self.backend.map_file(fd, size)
            finally:
                os.close(fd)                  # the mapping stays; no fd per allocation
        except (OSError, CudaError) as e:
            if counts:
                self._uncharge(size)
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if isinstance(e, CudaError):
                raise
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY, f"mapped host allocation failed: {e}") from None
        s.host[ptr] = HostAlloc(size, path)
        bisect.insort(s.bases, ptr)
        return {"ptr": ptr, "path": os.path.basename(path)}

    def op_host_mapped(self, s: Session, msg: dict, ident: bytes):
        h = s.host.get(msg["ptr"])
        if h is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{msg['ptr']:#x} is not a mapped host allocation")
        try:                               # both sides have it mapped: the name can go
            os.unlink(h.path)
        except FileNotFoundError:
            pass
        return {}

    def op_host_free(self, s: Session, msg: dict, ident: bytes):
        ptr = msg["ptr"]
        self._check_queue(s, msg)
        h = s.host.pop(ptr, None)
        if h is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{ptr:#x} is not a mapped host allocation")
        s.bases.remove(ptr)
        self._queue_op(s, msg, ident, lambda: self._drop_host(ptr, h), release=True)

    def op_memcpy_htod(self, s: Session, msg: dict, ident: bytes):
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

    def op_memcpy_dtoh(self, s: Session, msg: dict, ident: bytes):
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

    def op_memcpy_dtod(self, s: Session, msg: dict, ident: bytes):
        dst, src, n = msg["dst"], msg["src"], msg["size"]
        self._check_range(s, dst, n, "destination")
        self._check_range(s, src, n, "source")
        self._queue_op(s, msg, ident, lambda: self.backend.dtod(dst, src, n), stream=self._stream(s, msg),
                       device=True)

    def op_memset(self, s: Session, msg: dict, ident: bytes):
        dst, width, count = msg["dst"], msg["width"], msg["count"]
        if width not in (1, 2, 4):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"memset element width must be 1, 2 or 4, not {width}")
        self._check_range(s, dst, width * count, "destination")
        value = msg["value"]
        self._queue_op(s, msg, ident, lambda: self.backend.memset(dst, value, width, count),
                       stream=self._stream(s, msg), device=True)

    def op_module_load(self, s: Session, msg: dict, ident: bytes):
        kind = msg["kind"]
        if kind not in ("cuda-c", "ptx", "cubin", "fatbin"):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"unknown module kind '{kind}'")
        limit = self.limits["max_module_bytes"]
        for field in ("source", "image"):
            n = len(msg[field]) if field in msg else 0
            if n > limit:
                raise _err(E.CUDA_ERROR_INVALID_VALUE,
                           f"module {field} of {n} bytes exceeds the broker's max_module_bytes "
                           f"({limit})")
        nmod, limit = len(s.modules) + s.building, self.limits["max_modules_per_session"]
        if nmod >= limit:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cannot load another module: this session has {nmod} modules loaded or "
                       f"loading on {self.dev_name}, the broker's max_modules_per_session is "
                       f"{limit}; unload some first")
        self._check_handles(s, "a module")
        args = (kind, msg.get("source"), msg.get("image"), tuple(msg.get("options", ())))
        rid = msg["id"]
        s.building += 1                    # counted until it is registered or has failed

        def failed(err: bytes) -> None:
            s.building -= 1
            self._send(ident, err)

        def build() -> None:
            try:
                module = self.backend.load_module(*args)
            except CudaError as e:
                err = P.error(rid, e.code, e.message, e.log)   # `e` is unbound after except
                self._call_in_main(lambda: failed(err))
                return
            except Exception as e:
                log.exception("module build failed")
                err = P.error(rid, E.CUDA_ERROR_UNKNOWN, f"internal error: {e}")
                self._call_in_main(lambda: failed(err))
                return

            def register() -> None:
                s.building -= 1
                if s.closed:
                    self.backend.unload_module(module)
                    return
                h = self._new_handle()
                s.modules[h] = module
                self._send(ident, P.reply(rid, module=h))
            self._call_in_main(register)
        self.compiler.submit(build)

    def op_module_unload(self, s: Session, msg: dict, ident: bytes):
        self._check_queue(s, msg)
        m = s.modules.pop(msg["module"], None)
        if m is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"module {msg['module']:#x} is not one of this session's")
        for fh in [fh for fh, (mh, _, _) in s.functions.items() if mh == msg["module"]]:
            del s.functions[fh]
        for key in [k for k in s.fn_names if k[0] == msg["module"]]:
            del s.fn_names[key]
        for ptr in [p for p, (_, mh) in s.globals.items() if mh == msg["module"]]:
            del s.globals[ptr]
            s.bases.remove(ptr)
        self._queue_op(s, msg, ident, lambda: self.backend.unload_module(m), release=True)

    def _module(self, s: Session, h: int):
        m = s.modules.get(h)
        if m is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"module {h:#x} is not one of this session's")
        return m

    def op_get_function(self, s: Session, msg: dict, ident: bytes):
        fn, sizes = self.backend.get_function(self._module(s, msg["module"]), msg["name"])
        key = (msg["module"], msg["name"])
        h = s.fn_names.get(key)            # one handle per kernel, as cuModuleGetFunction
        if h is None:
            self._check_handles(s, "a function handle")
            h = s.fn_names[key] = self._new_handle()
            s.functions[h] = (msg["module"], fn, tuple(sizes))
        return {"function": h, "param_sizes": list(sizes)}

    def op_get_global(self, s: Session, msg: dict, ident: bytes):
        ptr, size = self.backend.get_global(self._module(s, msg["module"]), msg["name"])
        if ptr not in s.globals and size:       # copies to and from it are now in range
            s.globals[ptr] = (size, msg["module"])
            bisect.insort(s.bases, ptr)
        return {"ptr": ptr, "size": size}

    def op_launch(self, s: Session, msg: dict, ident: bytes):
        entry = s.functions.get(msg["function"])
        if entry is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"function {msg['function']:#x} is not one of this session's")
        _, fn, sizes = entry
        grid, block, args = msg["grid"], msg["block"], msg["args"]
        if len(grid) != 3 or len(block) != 3:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "grid and block must have 3 dimensions")
        for what, dims, lim in (("grid", grid, MAX_GRID), ("block", block, MAX_BLOCK)):
            if any(not 1 <= d <= m for d, m in zip(dims, lim)):
                raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{what} {tuple(dims)} outside 1..{lim}")
        if block[0] * block[1] * block[2] > 1024:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"block {tuple(block)} has {block[0] * block[1] * block[2]} threads; at most 1024")
        if msg["shared"] > self.device.get("max_shared_memory_per_block", 48 << 10):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{msg['shared']} bytes of dynamic shared memory "
                       "exceeds the device's limit")
        if len(args) != len(sizes) or any(len(a) != n for a, n in zip(args, sizes)):
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"kernel takes {len(sizes)} parameters of sizes {list(sizes)}; got "
                       f"{len(args)} of sizes {[len(a) for a in args]}")
        shared = msg["shared"]
        progress = [0]

        def run():
            # Preemptible only while a latency tenant shares the device (slicing costs a
            # little); a preempted kernel is resumed from `progress` at the next lease.
            if not self._lease_preemptible and progress[0] == 0:
                return self.backend.launch(fn, grid, block, shared, args) and None
            # A kernel suspended mid-grid resumes where it stopped, preemptible or not:
            # blocks that ran must not run again.
            yield_check = self._should_yield if self._lease_preemptible else (lambda: False)
            done = self.backend.launch(fn, grid, block, shared, args,
                                       should_yield=yield_check, progress=progress)
            return None if done else SUSPENDED
        self._queue_op(s, msg, ident, run,
                       stream=self._stream(s, msg), sync_point=False, kernel=True)

    def op_stream_create(self, s: Session, msg: dict, ident: bytes):
        self._check_handles(s, "a stream")
        h = self._new_handle()
        s.streams[h] = Stream(h)
        return {"stream": h}

    def op_stream_destroy(self, s: Session, msg: dict, ident: bytes):
        if msg["stream"] == 0 or s.streams.pop(msg["stream"], None) is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"stream {msg['stream']:#x} is not one of this session's")
        return {}   # work already queued on it still runs (as in CUDA)

    def _sync_payload_locked(self, s: Session, rid: int) -> bytes:
        """The reply of a synchronizing request: an error kept from async work, or success."""
        if s.deferred is not None:
            e, s.deferred = s.deferred, None
            return P.error(rid, e.code, e.message, e.log)
        return P.reply(rid)

    def _wait_for(self, s: Session, obj: Stream | Event, ident: bytes, rid: int) -> None:
        """Answer when everything queued on `obj` so far has run (now, if it has)."""
        with self._cv:
            if obj.pending:
                limit = 2 * self.limits["max_queued_ops_per_session"]
                if len(obj.waiters) >= limit:    # synchronize requests nobody waits for
                    raise _err(E.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                               f"{len(obj.waiters)} synchronize requests already wait on this "
                               f"stream or event (2 x max_queued_ops_per_session)")
                obj.waiters.append((s, ident, rid))
                return
            payload = self._sync_payload_locked(s, rid)
        self._send(ident, payload)

    def op_stream_sync(self, s: Session, msg: dict, ident: bytes):
        st = self._stream(s, msg)
        if st.handle == 0:
            # The legacy default stream orders against every blocking stream: wait for all
            # of this session's work queued so far.
            self._queue_op(s, msg, ident, lambda: None)
        else:
            self._wait_for(s, st, ident, msg["id"])

    def op_stream_query(self, s: Session, msg: dict, ident: bytes):
        return {"ready": self._stream(s, msg).pending == 0}

    def op_stream_wait_event(self, s: Session, msg: dict, ident: bytes):
        # Work runs in submission order, so the event's last record is already ahead of
        # anything queued after this: validation is all there is to do.
        self._stream(s, msg)
        self._event(s, msg["event"])
        if not msg.get("async"):
            return {}

    def op_event_create(self, s: Session, msg: dict, ident: bytes):
        self._check_handles(s, "an event")
        h = self._new_handle()
        s.events[h] = Event(h)
        return {"event": h}

    def op_event_destroy(self, s: Session, msg: dict, ident: bytes):
        if s.events.pop(msg["event"], None) is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"event {msg['event']:#x} is not one of this session's")
        return {}

    def op_event_record(self, s: Session, msg: dict, ident: bytes):
        ev = self._event(s, msg["event"])

        def record() -> None:
            ev.time_ns = time.perf_counter_ns()
        self._queue_op(s, msg, ident, record, stream=self._stream(s, msg), event=ev, sync_point=False)

    def op_event_sync(self, s: Session, msg: dict, ident: bytes):
        self._wait_for(s, self._event(s, msg["event"]), ident, msg["id"])

    def op_event_query(self, s: Session, msg: dict, ident: bytes):
        return {"ready": self._event(s, msg["event"]).pending == 0}

    def op_event_elapsed(self, s: Session, msg: dict, ident: bytes):
        a, b = self._event(s, msg["start"]), self._event(s, msg["end"])
        if a.pending or b.pending:
            raise _err(E.CUDA_ERROR_NOT_READY, "an event has not completed yet")
        if a.time_ns is None or b.time_ns is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, "an event was never recorded")
        return {"ms": (b.time_ns - a.time_ns) / 1e6}

    def op_ctx_sync(self, s: Session, msg: dict, ident: bytes):
        self._queue_op(s, msg, ident, lambda: None)


try:   # looked up once: every ctypes.CDLL() makes a class that only the full GC frees
    _fflush = ctypes.CDLL(None).fflush
except (OSError, AttributeError):
    _fflush = None


def _libc_fflush(stream) -> None:
    if _fflush is not None:
        _fflush(stream)


EXECUTOR_OVERHEAD_BYTES = 1 << 30   # interpreter, libraries, worker stacks, requests in flight


def bound_memory(kind: str, memory_limit: int) -> None:
    """An executor serves one tenant, but the node's memory is everyone's. On the CPU backend,
    whose device memory is the executor's own private memory, cap the process at the tenant's
    quota plus overhead (RLIMIT_DATA, soft), so nothing the tenant sends (a multi-frame message
    libzmq buffers whole, say) can make it take more: past it an allocation fails and at worst
    the executor dies, which only that tenant notices. Not on GPUs: the CUDA driver's own
    mappings are not sized by the quota (untested there)."""
    if kind != "cpu":
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = memory_limit + EXECUTOR_OVERHEAD_BYTES
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (OSError, ValueError) as e:
        log.warning("could not bound the executor's memory: %s", e)


def _die_with_parent() -> None:
    """An executor must not outlive its broker (PR_SET_PDEATHSIG, Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubecash-executor")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--device-json", required=True)
    ap.add_argument("--runtime-dir", required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--lease-fd", type=int, required=True)
    ap.add_argument("--memory-limit", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--owner", default="", help="uid:gid of the tenant's containers")
    ap.add_argument("--max-message-bytes", type=int, default=P.MAX_MESSAGE_BYTES)
    ap.add_argument("--limits", default="{}", help="JSON: per-session bounds (DEFAULT_LIMITS keys)")
    ap.add_argument("--no-sandbox", action="store_true",
                    help="CPU backend: run kernels unconfined (no seccomp filter)")
    a = ap.parse_args(argv)
    import json
    logging.basicConfig(level=os.environ.get("KUBECASH_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s executor[{a.tenant}/%(process)d] %(levelname)s %(message)s")
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a crash must not write tenant data to disk
    ex = Executor(a.tenant, json.loads(a.device_json), a.runtime_dir, a.control_fd,
                  a.lease_fd, a.memory_limit, a.threads, a.cache_dir, a.max_message_bytes,
                  limits={k: int(v) for k, v in json.loads(a.limits).items() if k in DEFAULT_LIMITS},
                  sandbox=not a.no_sandbox)
    bound_memory(ex.device["kind"], a.memory_limit)
    if a.owner:
        uid, gid = a.owner.split(":")
        ex.owner = (int(uid), int(gid))
    ex._capture_output()
    signal.signal(signal.SIGTERM, lambda *_: setattr(ex, "_stopping", True))
    ex.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
