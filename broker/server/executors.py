"""Executors: one process per (tenant, device), its lifecycle (spawn, ready, stop, exit and
why) and its private control socketpair (messages to it through an outbox, reports from it).

An executor starts when a session of its tenant first opens the device and ends with the
tenant's last session; a dead executor fails its sessions' requests cleanly.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import (
    SANDBOX_SIGNAL,
    E,
    ExitReason,
    ProtocolError,
    exit_reason,
)

from .. import confine
from ..devices import NodeDevice
from .tenants import clear_tenant_dir

if TYPE_CHECKING:
    from .tenants import PendingOpen, TenantState

log = logging.getLogger("kubecash.broker")
CONTROL_OUTBOX_MAX = 4096    # messages waiting for an executor that is busy, not stuck
EXECUTOR_STOP_TIMEOUT_S = 5.0
STDERR_BUDGET = 256 << 10    # bytes of an executor's stderr logged per minute


@dataclasses.dataclass(eq=False)      # kept in a set: identity is what matters
class ExecutorProc:
    tenant: TenantState
    device: NodeDevice
    proc: subprocess.Popen
    started: float
    ctl_sock: socket.socket | None = None     # private socketpair end: control messages
    outbox: collections.deque = dataclasses.field(default_factory=collections.deque)  # unsent
    lease_sock: socket.socket | None = None   # private socketpair end: leases go there
    ready: bool = False                    # it said "ready" on its control socketpair
    sessions: set[bytes] = dataclasses.field(default_factory=set)
    pending: dict[bytes, PendingOpen] = dataclasses.field(default_factory=dict)
    stopping: float | None = None          # when shutdown was asked
    fatal: tuple[int, str] | None = None   # the context-fatal error it reported before exiting
    device_ns: int = 0
    kernels: int = 0
    memory_used: int = 0
    kernel_carry_ns: int = 0               # run time of a preempted kernel in earlier leases
    kill_reason: str | None = None         # why the broker killed it (max_kernel_seconds) ...
    kill_code: E | None = E.CUDA_ERROR_LAUNCH_TIMEOUT   # ... and what its sessions are told (None: as it ended)
    stderr_partial: bytes = b""            # its output after the last newline
    stderr_window: float = 0.0             # when the current minute of its output began
    stderr_bytes: int = 0                  # output logged in that minute
    stderr_dropped: int = 0                # and dropped, over STDERR_BUDGET


class ExecutorControl:
    """The Broker's executor side (a mixin: the state it uses is set up in core.Broker)."""

    def _spawn_executor(self, t: TenantState, d: NodeDevice) -> ExecutorProc:
        q = t.config.quota_for(d.name)
        threads = self.settings.executor_threads or d.properties.get("cores", 1)
        confined = confine.can_confine() and d.kind == "cpu"
        cmd = [sys.executable, "-m", "kubecash.broker.executor",
               "--tenant", t.config.name, "--device-json", json.dumps(d.describe()),
               "--runtime-dir", self.runtime_dir,
               "--memory-limit", str(self._memory_limit(q, d)), "--threads", str(threads),
               "--cache-dir", self.settings.resolved_cache_dir,
               # Confined where tenant code runs on the host (README, "Sandbox"); a GPU
               # executor runs no host code of the tenant's, and keeps the driver's view.
               "--owner", "{:d}:{:d}".format(*self._executor_ids(t.config)) if confined else "",
               "--jail", self.jail_dir if confined else "",
               # A root executor left unconfined (a GPU's) gives the files it makes in the
               # tenant's shm/ to the tenant's uid, which owns the directory: else its
               # containers could not map them.
               "--file-owner", "{:d}:{:d}".format(*self._executor_ids(t.config))
               if confine.can_confine() and not confined else "",
               "--max-message-bytes", str(self.settings.max_message_bytes),
               "--limits", json.dumps(self.settings.limits.as_dict())]
        if not self.settings.sandbox:
            cmd.append("--no-sandbox")
        env = dict(os.environ)
        env.pop("KUBECASH_BROKER", None)   # the executor is never itself a brokered client
        # Two private socketpairs, one for leases (the runner thread's) and one for control
        # (the main loop's). Only this executor holds the other ends, so what arrives on them
        # is its own, with no handshake to forge; SEQPACKET keeps messages whole, and the
        # kernel's socket buffer bounds what an executor can queue at the broker.
        lease, lease_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its stderr is a pipe the broker reads, never the broker's own log file: code
            # in the executor could truncate, fill or forge that (README, "Sandbox").
            proc = subprocess.Popen(cmd + ["--lease-fd", str(lease_theirs.fileno()),
                                           "--control-fd", str(ctl_theirs.fileno())], env=env,
                                    stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                                    pass_fds=(lease_theirs.fileno(), ctl_theirs.fileno()))
        except BaseException:
            lease.close()
            ctl.close()
            raise
        finally:
            lease_theirs.close()
            ctl_theirs.close()
        lease.setblocking(False)
        ctl.setblocking(False)
        ex = ExecutorProc(t, d, proc, time.monotonic(), lease_sock=lease, ctl_sock=ctl)
        self._lease_fds[lease.fileno()] = ex
        self.poller.register(lease.fileno(), zmq.POLLIN)
        self._ctl_fds[ctl.fileno()] = ex
        self.poller.register(ctl.fileno(), zmq.POLLIN)
        os.set_blocking(proc.stderr.fileno(), False)
        self._err_fds[proc.stderr.fileno()] = ex
        self.poller.register(proc.stderr.fileno(), zmq.POLLIN)
        t.executors[d.name] = ex
        self.executors_running.add(ex)
        log.info("tenant %s: executor for %s started (pid %d)", t.config.name, d.name, proc.pid)
        return ex

    def _stop_executor(self, ex: ExecutorProc) -> None:
        if ex.stopping is None:
            ex.stopping = time.monotonic()
            # An exiting executor must not be granted the device.
            if self.tenants.get(ex.tenant.config.name) is ex.tenant:
                self.schedulers[ex.device.name].remove(ex.tenant.config.name)
                self._schedule(ex.device.name)
            if ex.ready:
                self._control_send(ex, "shutdown")
            else:
                ex.proc.terminate()

    def _reap_executors(self, now: float) -> None:
        """Executors that exited, never became ready, or overstay a shutdown."""
        for ex in list(self.executors_running):
            rc = ex.proc.poll()
            if rc is not None:
                self._executor_gone(ex, exit_reason(rc))
            elif not ex.ready and now - ex.started > self.settings.executor_start_timeout_s and not ex.kill_reason:
                ex.kill_reason = (f"not ready {self.settings.executor_start_timeout_s:g} s after it started "
                                  "(the broker's executor_start_timeout_s)")
                ex.kill_code = None
                ex.proc.kill()
            elif ex.stopping is not None and now - ex.stopping > EXECUTOR_STOP_TIMEOUT_S:
                ex.proc.kill()
        self._retired = [t for t in self._retired if t.executors]

    def _executor_gone(self, ex: ExecutorProc, end: ExitReason | str) -> None:
        """`end`: how its process ended (exit_reason), or why the broker let it go."""
        reason = end if isinstance(end, ExitReason) else ExitReason(E.CUDA_ERROR_LAUNCH_FAILED, end)
        why = reason.text
        t = ex.tenant
        if t.executors.get(ex.device.name) is not ex:
            return
        # What it said before it ended (why: a refused system call, a device error) may still
        # wait in the socketpair: read it before deciding what to tell its sessions.
        self._on_control(ex)
        self._on_stderr(ex, last=True)
        del t.executors[ex.device.name]
        self.executors_running.discard(ex)
        for fds, sock in ((self._lease_fds, ex.lease_sock), (self._ctl_fds, ex.ctl_sock)):
            if sock is not None:
                self._unwatch(fds, sock)
                sock.close()
        ex.lease_sock = ex.ctl_sock = None
        # A tenant removed by a reload may have been added again under the same name: the
        # scheduler entry and the files by that name are the new tenant's then.
        current = self.tenants.get(t.config.name) is t
        if current:
            self.schedulers[ex.device.name].remove(t.config.name)
            self._schedule(ex.device.name)
        clean = ex.stopping is not None and ex.kill_reason is None
        why = ex.kill_reason or why
        (log.info if clean else log.error)("tenant %s: executor for %s ended: %s",
                                           t.config.name, ex.device.name, why)
        if not clean:
            code = ex.kill_code if ex.kill_reason and ex.kill_code is not None else reason.code
            if ex.fatal is not None:          # it told us the device error that ended it
                code, why = ex.fatal[0], (f"killed by SIGSYS: {ex.fatal[1]}" if reason.signal == SANDBOX_SIGNAL
                                          else f"context-fatal device error: {ex.fatal[1]}" if ex.ready
                                          else f"it could not start: {ex.fatal[1]}")
            message = (f"the executor of tenant '{t.config.name}' on {ex.device.name} "
                       f"ended ({why}); this session's context on that device is lost")
            for token in ex.sessions | set(ex.pending):
                s = self.sessions.get(token)
                if s is None:
                    continue
                s.failed[ex.device.name] = (code, message)
                t.gate.send(s.ident, P.event("executor_died", device=ex.device.name,
                                                    code=int(code), error=message))
            for p in ex.pending.values():       # each open asked, repeated ones too
                p.answer(t.gate, lambda rid: P.error(rid, code, message))
        if not current:
            return
        # Remove what the executor left in the tenant's directory: by descriptor (the tenant
        # may have put a symlink anywhere in it), by its own names only, and off the main
        # loop (the tenant may have put a million files beside them).
        # Its socket now (a next executor binds the same name), its shm files off the loop.
        sock = os.path.basename(P.executor_socket_path(self.runtime_dir, t.config.name, ex.device.name))
        clear_tenant_dir(self.runtime_dir, t.config.name, sockets=(sock,), shm_prefix=None)
        threading.Thread(target=clear_tenant_dir, name="clear-shm", daemon=True,
                         args=(self.runtime_dir, t.config.name),
                         kwargs={"sockets": (), "shm_prefix": f"{ex.device.name}-{ex.proc.pid}-"}).start()
        # Opens that waited for this executor to go get a fresh one.
        waiting = {tok: p for tok, p in t.waiting_opens.pop(ex.device.name, {}).items()
                   if tok in self.sessions}
        if clean:
            waiting.update({tok: p for tok, p in ex.pending.items() if tok in self.sessions})
        if waiting and not self._closed:
            nx = self._spawn_executor(t, ex.device)
            nx.pending.update(waiting)

    # -- its stderr ----------------------------------------------------------------------
    def _on_stderr(self, ex: ExecutorProc, last: bool = False) -> None:
        """What the executor wrote to its stderr (its log, a traceback), logged as its own:
        line by line, control characters escaped, at most STDERR_BUDGET bytes a minute (the
        rest is counted, and dropped). With `last`, what is left, then the pipe is closed."""
        f = ex.proc.stderr
        if f is None or f.closed:
            return
        fd = f.fileno()
        for _ in range(16 if not last else 1 << 20):    # a bounded batch per pass
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if not data:
                break
            now = time.monotonic()
            if now - ex.stderr_window > 60:
                if ex.stderr_dropped:
                    log.warning("tenant %s: executor for %s: %d bytes of its output dropped",
                                ex.tenant.config.name, ex.device.name, ex.stderr_dropped)
                ex.stderr_window, ex.stderr_bytes, ex.stderr_dropped = now, 0, 0
            kept = data[:max(0, STDERR_BUDGET - ex.stderr_bytes)]
            ex.stderr_bytes += len(kept)
            ex.stderr_dropped += len(data) - len(kept)
            *lines, ex.stderr_partial = (ex.stderr_partial + kept).split(b"\n")
            if len(ex.stderr_partial) > 4096:
                lines.append(ex.stderr_partial)
                ex.stderr_partial = b""
            for line in lines:
                text = line.decode("utf-8", "replace")[:4096]
                text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
                log.info("tenant %s: executor for %s says: %s", ex.tenant.config.name, ex.device.name, text)
        if last or data == b"":
            if fd in self._err_fds:
                del self._err_fds[fd]
                self.poller.unregister(fd)
            f.close()

    # -- the control socketpair ---------------------------------------------------------
    def _control_send(self, ex: ExecutorProc, op: str, **fields: Any) -> None:
        if ex.ctl_sock is None:
            return
        ex.outbox.append(P.notice(op, **fields))
        if len(ex.outbox) > CONTROL_OUTBOX_MAX:
            # Thousands of messages unread: the executor has stopped reading its control
            # channel, and the sessions waiting on it would wait forever. Ending it tells them.
            log.error("tenant %s: executor for %s does not read its control channel; ending it",
                      ex.tenant.config.name, ex.device.name)
            ex.outbox.clear()
            ex.proc.kill()
            return
        if len(ex.outbox) == 1:
            self._flush_control(ex)

    def _flush_control(self, ex: ExecutorProc) -> None:
        """Send what waits for the executor; what its socket buffer cannot take yet waits for
        the socket to be writable (the poller watches POLLOUT only meanwhile)."""
        while ex.outbox and ex.ctl_sock is not None:
            try:
                ex.ctl_sock.send(ex.outbox[0])
            except BlockingIOError:
                if ex.ctl_sock.fileno() in self._ctl_fds:
                    self.poller.register(ex.ctl_sock.fileno(), zmq.POLLIN | zmq.POLLOUT)
                return
            except OSError:             # it is exiting; _executor_gone follows
                ex.outbox.clear()
                break
            ex.outbox.popleft()
        if ex.ctl_sock is not None and ex.ctl_sock.fileno() in self._ctl_fds:
            self.poller.register(ex.ctl_sock.fileno(), zmq.POLLIN)

    def _on_control(self, ex: ExecutorProc) -> None:
        """Reports from an executor's main loop, on its private control socketpair."""
        for _ in range(64):             # a bounded batch: one executor cannot hold the loop
            if ex.ctl_sock is None:
                return
            try:
                frame = ex.ctl_sock.recv(P.CONTROL_MESSAGE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:               # it closed its end: it is exiting
                self._unwatch(self._ctl_fds, ex.ctl_sock)
                return
            self._on_report(ex, frame)

    def _on_report(self, ex: ExecutorProc, frame: bytes) -> None:
        try:
            handler, msg = P.handler_for(self, P.REPORT, frame)
        except ProtocolError as e:
            log.error("tenant %s: bad message from the executor for %s: %s",
                      ex.tenant.config.name, ex.device.name, e)
            return
        if msg["op"] in ("ready", "fatal") or ex.ready:     # fatal: why it could not start, too
            handler(ex, msg)

    def _on_report_ready(self, ex: ExecutorProc, msg: dict) -> None:
        self._executor_ready(ex, msg)

    def _on_report_session_ended(self, ex: ExecutorProc, msg: dict) -> None:
        pass   # the broker forgot the session when it asked; the confirmation changes nothing

    def _on_report_fatal(self, ex: ExecutorProc, msg: dict) -> None:
        ex.fatal = (msg["code"], msg["error"])

    def _on_report_stats(self, ex: ExecutorProc, msg: dict) -> None:
        ex.device_ns, ex.kernels, ex.memory_used = msg["device_ns"], msg["kernels"], msg["memory_used"]

    def _on_report_session_added(self, ex: ExecutorProc, msg: dict) -> None:
        if msg["session"] in ex.sessions:
            return                      # a repeated confirmation changes nothing
        p = ex.pending.pop(msg["session"], None)
        if p is None or msg["session"] not in self.sessions:
            self._control_send(ex, "session_end", session=msg["session"])
            return
        ex.sessions.add(msg["session"])
        p.session.devices.add(ex.device.name)
        opened = self._open_reply(ex)
        p.answer(ex.tenant.gate, lambda rid: P.reply(rid, **opened))

    def _executor_ready(self, ex: ExecutorProc, msg: dict) -> None:
        t = ex.tenant
        if ex.ready or (msg["tenant"], msg["device"], msg["pid"]) != (
                t.config.name, ex.device.name, ex.proc.pid):
            log.error("tenant %s: executor for %s: a 'ready' that does not match it refused",
                      t.config.name, ex.device.name)
            return
        ex.ready = True
        if ex.stopping is None and self.tenants.get(t.config.name) is not t:
            self._stop_executor(ex)     # its tenant was removed meanwhile (sends shutdown)
            return
        if ex.stopping is not None:
            self._control_send(ex, "shutdown")
            return
        q = t.config.quota_for(ex.device.name)
        self.schedulers[ex.device.name].add(t.config.name, q.weight, q.klass,
                                            self._bucket_for(t, ex.device.name))
        for token in ex.pending:
            self._control_send(ex, "session_add", session=token)

    def _unwatch(self, fds: dict[int, ExecutorProc], sock: socket.socket) -> None:
        """Stop polling one of an executor's socketpair ends (`fds` is its lookup table)."""
        fd = sock.fileno()
        if fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

