"""The runner thread: runs queued work in per-session FIFO order, round robin across
sessions, only while it holds the broker's device lease; hands the lease back."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, ProtocolError, map_exceptions

from .state import (
    SUSPENDED,
    QueuedOp,
    SessionState,
    log,
)


class Runner:
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
            s: SessionState | None = None
            op: QueuedOp | None = None
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
                    s.running += 1
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
                    ls.send(P.notice("want"))
                self._poll_lease(ls, 100)
                continue
            if op.device and self._lease is not None and self._lease_t0 is None:
                self._lease_t0 = time.perf_counter_ns()
            try:
                self._execute(s, op)
            finally:
                with self._cv:
                    s.running -= 1
            if op.device and self._lease is not None:
                # The device is charged for the whole time it is held, from the start of the
                # lease's first work to the end of its last (what runs between is the tenant's).
                self._lease_used = time.perf_counter_ns() - self._lease_t0
                self._lease_kernels += op.kernel and not self._suspended
                self._poll_lease(ls, 0)          # a preemption may have come meanwhile
                if self._lease_used >= self._lease_quantum or self._preempted:
                    with self._cv:
                        more = bool(self._ready)
                    if more and self._lease_renewable and not (self._contended or self._preempted):
                        self._renew(ls)
                    else:
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
                handler, msg = P.handler_for(self, P.LEASE, frame)
            except ProtocolError as e:
                log.error("bad lease message: %s", e)
                continue
            handler(msg)

    def _on_lease_grant(self, msg: dict) -> None:
        self._lease, self._lease_quantum = msg["lease"], msg["quantum_ns"]
        self._lease_preemptible = msg.get("preemptible", False)
        self._lease_renewable = msg.get("renewable", False)
        self._contended = msg.get("contended", False)
        self._lease_used = self._lease_kernels = 0
        self._lease_t0 = None
        self._preempted = self._wanted = False

    def _on_lease_contended(self, msg: dict) -> None:
        if msg["lease"] == self._lease:
            self._contended = True

    def _on_lease_preempt(self, msg: dict) -> None:
        if msg["lease"] == self._lease:
            self._preempted = True

    def _maybe_fatal(self, error: CudaError | None) -> None:
        """A context-fatal ("sticky") device error ends this executor: its context is
        unusable. The broker hears why and tells this tenant's sessions; others go on."""
        if error is None or not error.sticky:
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

    def _renew(self, ls: socket.socket) -> None:
        """The quantum is spent, more work is queued and no one else wants the device: report
        the time and go on with the same lease (the broker preempts it if that changes)."""
        ls.send(P.notice("renew", lease=self._lease, used_ns=self._lease_used,
                         kernels=self._lease_kernels))
        self._lease_used = self._lease_kernels = 0
        self._lease_t0 = None

    def _give_back(self, ls: socket.socket, more: bool) -> None:
        fields = {"suspended": True} if self._suspended else {}
        ls.send(P.notice("release", lease=self._lease, used_ns=self._lease_used,
                         kernels=self._lease_kernels, more=more, **fields))
        self._lease = None
        self._wanted = more           # the broker counts a release with more work as a want

    def _execute(self, s: SessionState, op: QueuedOp) -> int:
        t0 = time.perf_counter_ns()
        result: dict[str, Any] | None = None
        error: CudaError | None = None
        self._suspended = False
        try:
            with map_exceptions("executing an operation", logger=log):
                result = op.fn() or {}
        except CudaError as e:
            error = e
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
