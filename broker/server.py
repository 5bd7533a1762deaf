"""The broker: the control plane of one node.

It serves each tenant on its own socket `<runtime_dir>/tenants/<tenant>/broker.sock` (a
session's tenant is the socket it came in on, never a name it claims), starts one executor
per (tenant, device) when a session first opens that device, ends it with the tenant's last
session, and purges sessions whose heartbeats stop. It never runs tenant code and never
holds tenant data: per-kernel traffic goes straight from clients to their executor.

The loop follows the Majordomo pattern (poll with the heartbeat interval, purge dead peers
each pass) with monotonic deadlines, no assertions on network input, and each session's
in-flight requests tracked so that a dead executor or session fails them cleanly.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import CUresult, ProtocolError

from . import config as cfg
from . import metrics
from .devices import Device, discover
from .gate import Event, Gate
from .notify import Notifier
from .scheduler import NS, DeviceScheduler, LimitBucket

log = logging.getLogger("kubecash.broker")
E = CUresult
EXECUTOR_START_TIMEOUT_S = 30.0
CONTROL_OUTBOX_MAX = 4096    # messages waiting for an executor that is busy, not stuck
EXECUTOR_STOP_TIMEOUT_S = 5.0
PUBLISH_INTERVAL_S = 1.0      # metrics snapshot and systemd STATUS= refresh
CACHE_TRIM_INTERVAL_S = 30.0  # how often the compiled-kernel cache is held to its cap
BROKER_MESSAGE_MAX = 16 << 10  # broker requests (hello, open, heartbeat...) are far smaller
THROTTLE_NOTICE_S = 1.0       # "throttled" events to a tenant's clients, at most this often
GATE_BATCH = 64               # raw chunks read from one tenant's socket per pass
STALE_BUILD_S = 600.0         # a build or load file this old was left by a killed executor


@dataclasses.dataclass
class PendingOpen:
    session: ClientSession
    ident: bytes
    req_id: int
    also: list = dataclasses.field(default_factory=list)   # (ident, req_id) of repeated opens


@dataclasses.dataclass
class ExecutorProc:
    tenant: TenantState
    device: Device
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
    kill_reason: str | None = None         # why the broker killed it (max_kernel_seconds)


@dataclasses.dataclass
class ClientSession:
    token: bytes
    tenant: TenantState
    ident: bytes                            # routing id of the client's main socket
    pid: int
    last_seen: float
    throttled_at_seen: float = 0.0           # its tenant socket's throttled_s() at last_seen
    devices: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)      # kept in sets: identity is what matters
class TenantState:
    config: cfg.Tenant               # replaced (not mutated) on live quota changes
    gate: Gate                       # its socket
    dir: str
    sessions: dict[bytes, ClientSession] = dataclasses.field(default_factory=dict)
    executors: dict[str, ExecutorProc] = dataclasses.field(default_factory=dict)
    # opens that came while the device's executor was shutting down: served by the next one
    waiting_opens: dict[str, dict[bytes, PendingOpen]] = dataclasses.field(default_factory=dict)


class Broker:
    def __init__(self, config: cfg.Config, devices: list[Device] | None = None):
        self.config = config
        self.settings = config.broker
        self.devices = {d.name: d for d in (devices if devices is not None else discover())}
        self.runtime_dir = os.path.abspath(self.settings.runtime_dir)
        self.private_dir = os.path.join(self.runtime_dir, "private")
        self.ctx = zmq.Context()
        self.tenants: dict[str, TenantState] = {}
        self.sessions: dict[bytes, ClientSession] = {}
        self.stopping = False
        self.reload_requested = False          # set by SIGHUP; acted on in the loop
        self._next_trim = 0.0                  # first pass trims the compiled-kernel cache
        self._retired: list[TenantState] = []  # removed by a reload, executors still exiting
        self.poller = zmq.Poller()
        self._sock_tenant: dict[zmq.Socket, TenantState] = {}
        self._paused: set[TenantState] = set()     # over their request rate: not polled
        self._ctl_fds: dict[int, ExecutorProc] = {}        # control socketpair fds
        self._lease_fds: dict[int, ExecutorProc] = {}      # lease socketpair fds
        self._closed = False
        self.notifier = Notifier()
        self.collector = metrics.BrokerCollector()
        self._metrics_server = None
        self.metrics_address: str | None = None
        quantum_ns = int(self.settings.quantum_ms * 1e6)
        self.schedulers = {name: DeviceScheduler(name, quantum_ns) for name in self.devices}
        # Limit credit: one bucket per tenant (its limit spans its devices), plus one per
        # (tenant, device) whose per-device table overrides the limit.
        self.buckets: dict[tuple[str, str | None], LimitBucket] = {}
        self.admin = self.ctx.socket(zmq.ROUTER)
        self.admin.setsockopt(zmq.LINGER, 0)
        self.admin.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.started_ns = time.monotonic_ns()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Create the runtime directory and bind every socket (clearing stale ones)."""
        os.makedirs(self.runtime_dir, exist_ok=True)
        os.makedirs(self.private_dir, mode=0o700, exist_ok=True)
        os.chmod(self.private_dir, 0o700)
        tenants_root = os.path.join(self.runtime_dir, "tenants")
        os.makedirs(tenants_root, exist_ok=True)
        # Containers' uids must traverse down to their own tenant directory, but not list
        # who else is here.
        os.chmod(self.runtime_dir, os.stat(self.runtime_dir).st_mode & 0o7777 | 0o011)
        os.chmod(tenants_root, 0o711)
        # A previous broker's leftovers (sockets, shared-memory files) must not block us.
        # Tenant directories themselves stay: running containers have them bind-mounted,
        # and a new directory would not be what they see.
        for name in os.listdir(tenants_root):
            d = os.path.join(tenants_root, name)
            if name not in self.config.tenants:
                shutil.rmtree(d, ignore_errors=True)
                continue
            for leftover in glob.glob(os.path.join(d, "*.sock")) + glob.glob(os.path.join(d, "shm", "*")):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
        os.makedirs(self.settings.resolved_cache_dir, mode=0o700, exist_ok=True)
        try:   # brokers before the control socketpair bound a socket here
            os.unlink(os.path.join(self.private_dir, "control.sock"))
        except OSError:
            pass
        admin_path = self.settings.resolved_admin_socket
        if os.path.exists(admin_path):
            os.unlink(admin_path)
        old_umask = os.umask(0o077)            # owner-only from the moment it exists
        try:
            self.admin.bind(f"ipc://{admin_path}")
        finally:
            os.umask(old_umask)
        self.poller.register(self.admin, zmq.POLLIN)
        now = time.monotonic_ns()
        for sched in self.schedulers.values():
            sched.created_ns = now
        for t in self.config.tenants.values():
            self._add_tenant(t)
        log.info("serving %d tenant(s) on %s; devices: %s", len(self.tenants), self.runtime_dir,
                 ", ".join(self.devices))

    def _add_tenant(self, t: cfg.Tenant) -> None:
        d = P.tenant_dir(self.runtime_dir, t.name)
        _own_tenant_dir(d, t.owner)
        gate = Gate(self.ctx, f"ipc://{P.broker_socket_path(self.runtime_dir, t.name)}",
                    tenant=t.name, max_bytes=self._broker_msg_max,
                    max_connections=self.settings.max_connections_per_tenant,
                    rate=self.settings.max_requests_per_tenant_s)
        # Connecting needs write permission on the socket file; the 0700 directory (owned by
        # the tenant's uid) is what keeps everyone else out.
        os.chmod(P.broker_socket_path(self.runtime_dir, t.name), 0o666)
        ts = TenantState(t, gate, d)
        self.tenants[t.name] = ts
        self._sock_tenant[gate.sock] = ts
        self.poller.register(gate.sock, zmq.POLLIN)

    def serve_forever(self) -> None:
        self.start()
        if self.settings.metrics_address:
            served = metrics.serve(self.settings.metrics_address, self.collector)
            if served:
                self._metrics_server, self.metrics_address = served
        self._publish()
        self.notifier.ready(self._status_line())
        next_publish = time.monotonic() + PUBLISH_INTERVAL_S
        try:
            while not self.stopping:
                if self.reload_requested:
                    self.reload_requested = False
                    self.notifier.reloading()
                    try:
                        self.reload()
                    except _Refused as e:
                        log.error("%s", e.message)
                    self.notifier.ready(self._status_line())
                self.serve_once(timeout_s=min(0.1, self.settings.heartbeat_interval_s))
                if time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + PUBLISH_INTERVAL_S
                    self._publish()
                    self.notifier.status(self._status_line())
                self.notifier.tick()
        finally:
            self.notifier.stopping()
            self.close()

    def _trim_cache(self) -> None:
        """Hold the compiled-kernel cache (shared by all tenants' executors) to its cap, so
        no tenant can fill the node's disk by loading ever new modules. Executors load
        private copies, so removing a cached build never disturbs one in use."""
        d = self.settings.resolved_cache_dir
        now = time.time()
        builds, total = [], 0
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                if e.name.startswith((".build-", ".load-")):
                    if now - st.st_mtime > STALE_BUILD_S:
                        shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
                elif e.name.endswith(".so"):
                    builds.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
            except OSError:
                continue
        if total <= self.settings.cache_max_bytes:
            return
        builds.sort()
        target = self.settings.cache_max_bytes * 0.8
        for _, size, path in builds:
            if total <= target:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
        log.info("compiled-kernel cache trimmed to %d bytes", total)

    def _publish(self) -> None:
        """Hand the metrics endpoint a fresh snapshot (it never reads live state)."""
        self.collector.publish(self._admin_status({}))

    def _status_line(self) -> str:
        sessions = sum(len(t.sessions) for t in self.tenants.values())
        executors = sum(len(t.executors) for t in self.tenants.values())
        draining = [n for n, sc in self.schedulers.items() if sc.draining]
        return (f"{len(self.tenants)} tenants, {sessions} sessions, {executors} executors on "
                f"{', '.join(self.devices)}" + (f"; draining {', '.join(draining)}" if draining else ""))

    def serve_once(self, timeout_s: float) -> None:
        now = time.monotonic_ns()
        for sched in self.schedulers.values():   # wake when a capped tenant regains credit
            wait = sched.ns_until_next_eligible(now) if sched.holder is None else None
            if wait is not None:
                timeout_s = min(timeout_s, wait / NS)
        backlog = []                             # requests received but not yet handled
        for t in self.tenants.values():          # tenants over their request rate wait
            t.gate.refill(now / NS)
            if t.gate.paused:
                timeout_s = min(timeout_s, t.gate.seconds_to_resume())
                continue
            if t in self._paused:
                self._paused.discard(t)
                self.poller.register(t.gate.sock, zmq.POLLIN)
            if t.gate.has_pending:
                backlog.append(t)
                timeout_s = 0
        ready = self.poller.poll(max(0, math.ceil(timeout_s * 1000)))
        for t in backlog:
            if not t.gate.sock.closed and not any(sock is t.gate.sock for sock, _ in ready):
                self._on_gate(t)
        for sock, mask in ready:
            if isinstance(sock, int):
                ex = self._lease_fds.get(sock)
                if ex is not None:
                    self._on_lease(ex)
                ex = self._ctl_fds.get(sock)
                if ex is not None and mask & zmq.POLLOUT:
                    self._flush_control(ex)
                if ex is not None and mask & zmq.POLLIN:
                    self._on_control(ex)
                continue
            t = self._sock_tenant.get(sock)
            if t is not None:
                self._on_gate(t)
                continue
            for _ in range(256):   # drain a bounded batch from each ready socket
                # An earlier message of this batch may have closed it (a reload removing
                # the tenant): skip what is no longer ours.
                if sock.closed:
                    break
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:
                    log.error("receive failed on a socket: %s", e)
                    break
                self._on_admin(frames)
        self._housekeeping()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self.sessions.values()):
            self._end_session(s, "broker shutting down")
        for t in self.tenants.values():
            for ex in list(t.executors.values()):
                self._stop_executor(ex)
        deadline = time.monotonic() + EXECUTOR_STOP_TIMEOUT_S
        # A busy executor's "shutdown" may still wait in its control outbox: keep sending.
        running = [ex for t in self.tenants.values() for ex in t.executors.values()]
        while time.monotonic() < deadline and any(ex.proc.poll() is None for ex in running):
            for ex in running:
                self._flush_control(ex)
            time.sleep(0.01)
        for t in self.tenants.values():
            for ex in list(t.executors.values()):
                try:
                    ex.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    ex.proc.kill()
                    ex.proc.wait()
                self._executor_gone(ex, "broker shutting down")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.notifier.close()
        for t in self.tenants.values():
            t.gate.close()
        self.admin.close()
        self.ctx.term()
        for t in self.tenants.values():     # sockets go; the (mounted) directories stay
            for leftover in glob.glob(os.path.join(t.dir, "*.sock")) + glob.glob(os.path.join(t.dir, "shm", "*")):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass

    # -- tenant sockets -------------------------------------------------------------------
    def _on_gate(self, t: TenantState) -> None:
        """A bounded batch from one tenant's socket; a tenant past its request rate is left
        unread (back-pressure) until its budget refills."""
        for kind, ident, what in t.gate.receive(GATE_BATCH):
            if t.gate.sock.closed:          # an earlier request's reload removed the tenant
                return
            if kind is Event.MESSAGE:
                self._on_tenant(t, ident, what)
            elif kind is Event.REFUSED:
                t.gate.send(ident, P.error(0, E.CUDA_ERROR_INVALID_VALUE, what))
            elif kind is Event.OVER_LIMIT:
                try:
                    rid = P.request_id_of(P.unpack(what, self._broker_msg_max))
                except ProtocolError:
                    rid = 0
                t.gate.send(ident, P.error(rid, E.CUDA_ERROR_NOT_PERMITTED, t.gate.over_limit_reason()))
            else:
                self._connection_closed(t, ident)
        if t.gate.paused and t not in self._paused and not t.gate.sock.closed:
            self._paused.add(t)
            self.poller.unregister(t.gate.sock)
            # Clients wait for heartbeat answers; tell them the silence is throttling, so
            # they do not take the broker for dead. At most once a second: a flood pauses the
            # socket every few milliseconds, and notices must not crowd out the replies.
            now = time.monotonic()
            if now - t.gate.last_notice >= THROTTLE_NOTICE_S:
                t.gate.last_notice = now
                t.gate.broadcast(P.event("throttled", seconds=round(t.gate.seconds_to_resume(), 3)))

    def _connection_closed(self, t: TenantState, ident: bytes) -> None:
        """A client's main socket closes only when it closes its session or exits: end what
        it left open now, rather than at the heartbeat timeout."""
        for s in [s for s in t.sessions.values() if s.ident == ident]:
            self._end_session(s, "client connection closed")

    def _on_tenant(self, t: TenantState, ident: bytes, frame: bytes) -> None:
        msg: Any = None
        try:
            msg = P.unpack(frame, self._broker_msg_max)
            op = P.check_request(msg, P.BROKER_OPS)
            if op == "hello":
                result = self._hello(t, ident, msg)
            else:
                s = self.sessions.get(msg["session"])
                if s is None or s.tenant is not t:
                    raise _Refused(E.CUDA_ERROR_INVALID_CONTEXT,
                                   "unknown or ended session (send hello to open one)")
                s.last_seen = time.monotonic()
                s.throttled_at_seen = t.gate.throttled_s(s.last_seen)
                result = getattr(self, "_op_" + op)(s, ident, msg)
            if result is not None:
                t.gate.send(ident, P.reply(msg["id"], **result))
        except ProtocolError as e:
            t.gate.send(ident, P.error(P.request_id_of(msg), P.PROTOCOL_ERROR_CODE, str(e)))
        except _Refused as e:
            t.gate.send(ident, P.error(P.request_id_of(msg), e.code, e.message))
        except Exception as e:  # a bug in one handler must not take the node down
            log.exception("internal error handling a tenant request")
            t.gate.send(ident, P.error(P.request_id_of(msg), E.CUDA_ERROR_UNKNOWN,
                                              f"internal error: {type(e).__name__}"))

    @staticmethod
    def _send(sock: zmq.Socket, ident: bytes, payload: bytes) -> None:
        try:
            sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone or not reading; heartbeats will tell

    @property
    def _broker_msg_max(self) -> int:
        return min(BROKER_MESSAGE_MAX, self.settings.max_message_bytes)

    def _hello(self, t: TenantState, ident: bytes, msg: dict) -> dict:
        limit = self.settings.max_sessions_per_tenant
        if len(t.sessions) >= limit:
            raise _Refused(E.CUDA_ERROR_NOT_PERMITTED,
                           f"tenant '{t.config.name}' has {len(t.sessions)} sessions open, the "
                           f"broker's max_sessions_per_tenant is {limit}; close one (or wait "
                           f"{self.settings.heartbeat_timeout_s:g} s for dead ones to expire)")
        token = secrets.token_bytes(16)
        now = time.monotonic()
        s = ClientSession(token, t, ident, msg.get("pid", 0), now, t.gate.throttled_s(now))
        t.sessions[token] = s
        self.sessions[token] = s
        log.info("tenant %s: session %s opened (pid %s)", t.config.name, token.hex()[:8], s.pid)
        return {"session": token, "tenant": t.config.name,
                "heartbeat_interval": self.settings.heartbeat_interval_s,
                "heartbeat_timeout": self.settings.heartbeat_timeout_s,
                "devices": [self._device_view(t, d) for d in self.devices.values()
                            if t.config.may_use(d.name)]}

    def _device_view(self, t: TenantState, d: Device) -> dict:
        q = t.config.quota_for(d.name)
        return {**d.describe(), "memory_limit": self._memory_limit(q, d),
                "weight": q.weight, "limit": q.limit, "class": q.klass}

    @staticmethod
    def _memory_limit(q: cfg.Quota, d: Device) -> int:
        return d.total_memory if q.memory is None else min(q.memory, d.total_memory)

    def _op_heartbeat(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        return {}

    def _op_close(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        self._end_session(s, "closed by the client")
        return {}

    def _op_status(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        t = s.tenant
        return {"tenant": t.config.name, "sessions": len(t.sessions),
                "devices": {name: {"memory_used": ex.memory_used, "device_ns": ex.device_ns,
                                   "kernels": ex.kernels, "pid": ex.proc.pid}
                            for name, ex in t.executors.items()}}

    def _op_open_device(self, s: ClientSession, ident: bytes, msg: dict) -> dict | None:
        name = msg["device"]
        t = s.tenant
        d = self.devices.get(name)
        if d is None or not t.config.may_use(name):
            raise _Refused(E.CUDA_ERROR_INVALID_DEVICE,
                           f"device '{name[:64]}' is not available to tenant '{t.config.name}'")
        if name in s.failed:
            code, why = s.failed[name]
            raise _Refused(code, why)
        ex = t.executors.get(name)
        if ex is not None and ex.stopping is not None:
            # It is exiting and will not take the session; the next executor will.
            waiting = t.waiting_opens.setdefault(name, {})
            if s.token in waiting:
                waiting[s.token].also.append((ident, msg["id"]))
            else:
                waiting[s.token] = PendingOpen(s, ident, msg["id"])
            return None
        if ex is None:
            ex = self._spawn_executor(t, d)
        if s.token in ex.sessions:
            return self._open_reply(ex)
        if s.token in ex.pending:           # asked again before the first was answered
            ex.pending[s.token].also.append((ident, msg["id"]))
            return None
        ex.pending[s.token] = PendingOpen(s, ident, msg["id"])
        if ex.ready:
            self._control_send(ex, "session_add", session=s.token)
        return None   # answered when the executor confirms the session

    def _open_reply(self, ex: ExecutorProc) -> dict:
        return {"address": os.path.basename(P.executor_socket_path(
                    self.runtime_dir, ex.tenant.config.name, ex.device.name)),
                "memory_limit": self._memory_limit(ex.tenant.config.quota_for(ex.device.name),
                                                   ex.device)}

    # -- sessions -----------------------------------------------------------------------
    def _end_session(self, s: ClientSession, why: str) -> None:
        if self.sessions.pop(s.token, None) is None:
            return
        t = s.tenant
        t.sessions.pop(s.token, None)
        log.info("tenant %s: session %s ended (%s)", t.config.name, s.token.hex()[:8], why)
        for waiting in t.waiting_opens.values():
            waiting.pop(s.token, None)
        for ex in list(t.executors.values()):
            ex.pending.pop(s.token, None)
            if s.token in ex.sessions:
                ex.sessions.discard(s.token)
                self._control_send(ex, "session_end", session=s.token)
            if not ex.sessions and not ex.pending and not t.sessions:
                self._stop_executor(ex)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        timeout = self.settings.heartbeat_timeout_s
        # Silence counts only while the broker was reading: a tenant over its request rate
        # is left unread, and its sessions must not expire for that.
        for s in [s for s in self.sessions.values()
                  if now - s.last_seen - (s.tenant.gate.throttled_s(now) - s.throttled_at_seen) > timeout]:
            self._end_session(s, f"no heartbeat for {timeout:g} s")
        for t in [*self.tenants.values(), *self._retired]:
            for ex in list(t.executors.values()):
                rc = ex.proc.poll()
                if rc is not None:
                    self._executor_gone(ex, _exit_reason(rc))
                elif not ex.ready and now - ex.started > EXECUTOR_START_TIMEOUT_S:
                    ex.proc.kill()
                elif ex.stopping is not None and now - ex.stopping > EXECUTOR_STOP_TIMEOUT_S:
                    ex.proc.kill()
        self._retired = [t for t in self._retired if t.executors]
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + CACHE_TRIM_INTERVAL_S
            self._trim_cache()
        self._enforce_kernel_time()
        for name in self.schedulers:
            self._schedule(name)

    def _enforce_kernel_time(self) -> None:
        """max_kernel_seconds. A lease lasts at most a quantum plus the kernel that crosses
        it, so a lease held longer than quantum + max_kernel_seconds (counting what a
        preempted kernel already ran in earlier leases) means a kernel ran past the limit:
        its executor is killed, and its sessions get a sticky CUDA_ERROR_LAUNCH_TIMEOUT."""
        now = time.monotonic_ns()
        for dname, sched in self.schedulers.items():
            e = sched.holder
            t = self.tenants.get(e.tenant) if e is not None else None
            ex = t.executors.get(dname) if t is not None else None
            if ex is None or ex.kill_reason is not None:
                continue
            limit_s = t.config.quota_for(dname).max_kernel_seconds
            if limit_s <= 0:
                continue
            if now - sched.lease_start + ex.kernel_carry_ns > sched.quantum_ns + limit_s * NS:
                ex.kill_reason = (f"a kernel ran longer than max_kernel_seconds = {limit_s:g} s, "
                                  f"tenant '{t.config.name}''s limit; the broker ended the executor")
                log.error("tenant %s: executor for %s killed: %s", t.config.name, dname,
                          ex.kill_reason)
                ex.proc.kill()

    # -- executors ----------------------------------------------------------------------
    def _spawn_executor(self, t: TenantState, d: Device) -> ExecutorProc:
        q = t.config.quota_for(d.name)
        threads = self.settings.executor_threads or d.properties.get("cores", 1)
        cmd = [sys.executable, "-m", "kubecash.broker.executor",
               "--tenant", t.config.name, "--device-json", json.dumps(d.describe()),
               "--runtime-dir", self.runtime_dir,
               "--memory-limit", str(self._memory_limit(q, d)), "--threads", str(threads),
               "--cache-dir", self.settings.resolved_cache_dir,
               "--owner", "" if t.config.owner is None else "%d:%d" % t.config.owner,
               "--max-message-bytes", str(self.settings.max_message_bytes),
               "--limits", json.dumps({k: getattr(self.settings, k) for k in (
                   "max_handles_per_session", "max_modules_per_session", "max_module_bytes",
                   "max_queued_ops_per_session")})]
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
            proc = subprocess.Popen(cmd + ["--lease-fd", str(lease_theirs.fileno()),
                                           "--control-fd", str(ctl_theirs.fileno())], env=env,
                                    stdin=subprocess.DEVNULL, close_fds=True,
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
        t.executors[d.name] = ex
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

    def _executor_gone(self, ex: ExecutorProc, why: str) -> None:
        t = ex.tenant
        if t.executors.get(ex.device.name) is not ex:
            return
        del t.executors[ex.device.name]
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
            code = (E.CUDA_ERROR_LAUNCH_TIMEOUT if ex.kill_reason else
                    E.CUDA_ERROR_ILLEGAL_ADDRESS if "SIGSEGV" in why or "SIGBUS" in why
                    else E.CUDA_ERROR_LAUNCH_FAILED)
            if ex.fatal is not None:          # it told us the device error that ended it
                code, why = ex.fatal[0], (f"killed by SIGSYS: {ex.fatal[1]}" if "SIGSYS" in why
                                          else f"context-fatal device error: {ex.fatal[1]}")
            message = (f"the executor of tenant '{t.config.name}' on {ex.device.name} "
                       f"ended ({why}); this session's context on that device is lost")
            for token in ex.sessions | set(ex.pending):
                s = self.sessions.get(token)
                if s is None:
                    continue
                s.failed[ex.device.name] = (code, message)
                t.gate.send(s.ident, P.event("executor_died", device=ex.device.name,
                                                    code=int(code), error=message))
            for p in ex.pending.values():
                t.gate.send(p.ident, P.error(p.req_id, code, message))
        if not current:
            return
        # Remove what the executor left in the tenant's directory.
        for path in glob.glob(os.path.join(t.dir, "shm", f"{ex.device.name}-*")):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.unlink(P.executor_socket_path(self.runtime_dir, t.config.name, ex.device.name))
        except OSError:
            pass
        # Opens that waited for this executor to go get a fresh one.
        waiting = {tok: p for tok, p in t.waiting_opens.pop(ex.device.name, {}).items()
                   if tok in self.sessions}
        if clean:
            waiting.update({tok: p for tok, p in ex.pending.items() if tok in self.sessions})
        if waiting and not self._closed:
            nx = self._spawn_executor(t, ex.device)
            nx.pending.update(waiting)

    def _control_send(self, ex: ExecutorProc, op: str, **fields: Any) -> None:
        if ex.ctl_sock is None:
            return
        ex.outbox.append(P.pack({"v": P.VERSION, "op": op, **fields}))
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
            op, msg = P.decode(frame, P.EXECUTOR_REPORTS)
        except ProtocolError as e:
            log.error("tenant %s: bad message from the executor for %s: %s",
                      ex.tenant.config.name, ex.device.name, e)
            return
        if op == "ready":
            self._executor_ready(ex, msg)
            return
        if not ex.ready:
            return
        if op == "session_added":
            if msg["session"] in ex.sessions:
                return                      # a repeated confirmation changes nothing
            p = ex.pending.pop(msg["session"], None)
            if p is None or msg["session"] not in self.sessions:
                self._control_send(ex, "session_end", session=msg["session"])
                return
            ex.sessions.add(msg["session"])
            p.session.devices.add(ex.device.name)
            answer = P.reply(p.req_id, **self._open_reply(ex))
            ex.tenant.gate.send(p.ident, answer)
            for ident2, rid in p.also:
                ex.tenant.gate.send(ident2, P.reply(rid, **self._open_reply(ex)))
        elif op == "fatal":
            ex.fatal = (msg["code"], msg["error"])
        elif op == "stats":
            ex.device_ns, ex.kernels, ex.memory_used = msg["device_ns"], msg["kernels"], msg["memory_used"]

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

    def _on_lease(self, ex: ExecutorProc) -> None:
        """Wants and releases from an executor's runner, on its private socketpair."""
        for _ in range(64):
            try:
                frame = ex.lease_sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                frame = b""
            if not frame:                 # the executor closed its end: it is exiting
                self._unwatch(self._lease_fds, ex.lease_sock)
                return
            try:
                op, msg = P.decode(frame, P.EXECUTOR_REPORTS)
            except ProtocolError as e:
                log.error("bad lease message from %s/%s: %s", ex.tenant.config.name, ex.device.name, e)
                continue
            sched = self.schedulers[ex.device.name]
            now = time.monotonic_ns()
            if op == "want":
                if sched.want(ex.tenant.config.name, now) and sched.holder is not None:
                    hx = self.tenants[sched.holder.tenant].executors.get(ex.device.name)
                    if hx is not None:
                        self._lease_send(hx, "preempt", lease=sched.lease)
            elif op == "release":
                held_ns = now - sched.lease_start
                if sched.release(ex.tenant.config.name, msg["lease"], msg["used_ns"],
                                 msg["kernels"], msg["more"], now):
                    # a kernel preempted mid-grid keeps counting toward max_kernel_seconds
                    ex.kernel_carry_ns = ex.kernel_carry_ns + held_ns if msg.get("suspended") else 0
            self._schedule(ex.device.name)

    def _unwatch(self, fds: dict[int, ExecutorProc], sock: socket.socket) -> None:
        """Stop polling one of an executor's socketpair ends (`fds` is its lookup table)."""
        fd = sock.fileno()
        if fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _lease_send(self, ex: ExecutorProc, op: str, **fields: Any) -> None:
        if ex.lease_sock is not None:
            try:
                ex.lease_sock.send(P.pack({"v": P.VERSION, "op": op, **fields}))
            except OSError as e:   # it is exiting; its death is handled by housekeeping
                log.info("lease message to %s/%s not sent: %s", ex.tenant.config.name,
                         ex.device.name, e)

    def _schedule(self, device: str) -> None:
        """Lease the device to the next holder if it is free and someone may run."""
        sched = self.schedulers[device]
        g = sched.next_grant(time.monotonic_ns())
        if g is None:
            return
        ex = self.tenants[g.entity.tenant].executors.get(device)
        if ex is None or ex.lease_sock is None:
            sched.remove(g.entity.tenant)
            return
        preemptible = g.entity.klass == "batch" and any(
            e.klass == "latency" for e in sched.entities.values())
        self._lease_send(ex, "grant", lease=g.lease, quantum_ns=g.quantum_ns,
                         preemptible=preemptible)

    # -- the operator's socket ----------------------------------------------------------
    def _on_admin(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident, frame = frames
        msg: Any = None
        try:
            msg = P.unpack(frame, 1 << 20)
            op = P.check_request(msg, P.ADMIN_OPS)
            result = getattr(self, "_admin_" + op)(msg)
            self._send(self.admin, ident, P.reply(msg["id"], **result))
        except ProtocolError as e:
            self._send(self.admin, ident, P.error(P.request_id_of(msg), P.PROTOCOL_ERROR_CODE, str(e)))
        except _Refused as e:
            self._send(self.admin, ident, P.error(P.request_id_of(msg), e.code, e.message))
        except Exception as e:
            log.exception("internal error handling an admin request")
            self._send(self.admin, ident, P.error(P.request_id_of(msg), E.CUDA_ERROR_UNKNOWN,
                                                  f"internal error: {type(e).__name__}: {e}"))

    def _admin_status(self, msg: dict) -> dict:
        now = time.monotonic_ns()
        devices = {}
        for name, d in self.devices.items():
            sched = self.schedulers[name]
            busy = {}
            for w in (1, 10, 60):
                span = min(w * NS, now - sched.created_ns) or 1
                busy[f"{w}s"] = sum(u for e in sched.entities.values()
                                    for t, u in e.history if t >= now - w * NS) / span
            devices[name] = {**d.describe(), "busy": busy, "busy_ns": sched.busy_ns,
                             "holder": sched.holder.tenant if sched.holder else None,
                             "draining": sched.draining}
        tenants = {}
        for name, t in self.tenants.items():
            per_dev = {}
            for dname, d in self.devices.items():
                if not t.config.may_use(dname):
                    continue
                q = t.config.quota_for(dname)
                ex = t.executors.get(dname)
                e = self.schedulers[dname].entities.get(name)
                per_dev[dname] = {
                    "weight": q.weight, "limit": q.limit, "class": q.klass,
                    "memory_limit": self._memory_limit(q, d),
                    "memory_used": ex.memory_used if ex else 0,
                    "executor_pid": ex.proc.pid if ex else None,
                    "used_ns": e.used_ns if e else 0, "kernels": e.kernels if e else 0,
                    "grants": e.grants if e else 0, "queue_wait_ns": e.wait_ns if e else 0,
                    "share": self.schedulers[dname].shares(e, now) if e else {},
                    "queue_wait": self.schedulers[dname].queue_wait(e) if e else
                    {"bounds": [], "counts": [], "sum": 0.0, "count": 0},
                    "runnable": bool(e and e.runnable),
                }
            tenants[name] = {"sessions": len(t.sessions), "devices": per_dev,
                             "connections": t.gate.connections,
                             "refused_connections": t.gate.refused_connections,
                             "refused_messages": t.gate.refused_messages,
                             "throttled": t.gate.paused}
        return {"devices": devices, "tenants": tenants, "uptime_s": (now - self.started_ns) / NS,
                "quantum_ms": self.settings.quantum_ms, "runtime_dir": self.runtime_dir,
                "metrics_address": self.metrics_address, "config": self.config.path}

    def _admin_evict(self, msg: dict) -> dict:
        """End every session of a tenant now; its executors exit and free everything."""
        t = self.tenants.get(msg["tenant"])
        if t is None:
            raise _Refused(E.CUDA_ERROR_INVALID_VALUE, f"no tenant '{msg['tenant']}'")
        ended = len(t.sessions)
        for s in list(t.sessions.values()):
            t.gate.send(s.ident, P.event("session_ended", code=int(E.CUDA_ERROR_DEINITIALIZED),
                                                error=f"tenant '{t.config.name}' was evicted by the operator"))
            self._end_session(s, "evicted by the operator")
        for ex in list(t.executors.values()):
            self._stop_executor(ex)
        return {"tenant": t.config.name, "sessions_ended": ended}

    def _admin_drain(self, msg: dict) -> dict:
        """No new leases on the device (work running now completes); undo resumes."""
        sched = self.schedulers.get(msg["device"])
        if sched is None:
            raise _Refused(E.CUDA_ERROR_INVALID_DEVICE, f"no device '{msg['device']}'")
        sched.draining = not msg.get("undo", False)
        if not sched.draining:
            self._schedule(msg["device"])
        log.info("device %s %s", msg["device"], "draining" if sched.draining else "resumed")
        return {"device": msg["device"], "draining": sched.draining,
                "holder": sched.holder.tenant if sched.holder else None}

    def _admin_reload(self, msg: dict) -> dict:
        return self.reload()

    def reload(self) -> dict:
        """Re-read the quota file and apply it atomically; an invalid file changes nothing."""
        try:
            new = cfg.load(self.config.path, device_count=len(self.devices))
        except cfg.ConfigError as e:
            raise _Refused(E.CUDA_ERROR_INVALID_VALUE,
                           f"reload refused, the running configuration stays: {e}") from None
        restart_only = ("runtime_dir", "cache_dir", "max_message_bytes", "metrics_address",
                        "admin_socket")
        pending = [k for k in restart_only if getattr(new.broker, k) != getattr(self.settings, k)
                   and not (k == "runtime_dir" and os.path.abspath(new.broker.runtime_dir) == self.runtime_dir)]
        self.settings = dataclasses.replace(
            new.broker, **{k: getattr(self.settings, k) for k in restart_only})
        self.config = dataclasses.replace(new, broker=self.settings)
        quantum_ns = int(self.settings.quantum_ms * 1e6)
        for sched in self.schedulers.values():
            sched.quantum_ns = quantum_ns
        for b in self.buckets.values():
            b.quantum_ns = quantum_ns
        removed = [n for n in self.tenants if n not in new.tenants]
        added = [n for n in new.tenants if n not in self.tenants]
        for name in removed:
            self._retire_tenant(self.tenants[name])
        for name in added:
            self._add_tenant(new.tenants[name])
        for name, t in self.tenants.items():
            if name not in added and t.config != new.tenants[name]:
                if t.config.owner != new.tenants[name].owner:
                    _own_tenant_dir(t.dir, new.tenants[name].owner)   # executors: next start
                t.config = new.tenants[name]
                self._apply_quota(t)
        log.info("configuration reloaded from %s: %d tenants (added %s, removed %s)%s",
                 self.config.path, len(self.tenants), added or "none", removed or "none",
                 f"; {', '.join(pending)} take effect at restart" if pending else "")
        return {"tenants": sorted(self.tenants), "added": added, "removed": removed,
                "restart_needed_for": pending}

    def _retire_tenant(self, t: TenantState) -> None:
        """A tenant removed from the configuration: its sessions end cleanly, its socket goes."""
        for s in list(t.sessions.values()):
            t.gate.send(s.ident, P.event("session_ended", code=int(E.CUDA_ERROR_DEINITIALIZED),
                                                error=f"tenant '{t.config.name}' was removed "
                                                      "from the broker's configuration"))
            self._end_session(s, "tenant removed from the configuration")
        for name, sched in self.schedulers.items():
            sched.forget(t.config.name)
        for ex in list(t.executors.values()):
            self._stop_executor(ex)
        if t in self._paused:
            self._paused.discard(t)
        else:
            self.poller.unregister(t.gate.sock)
        del self._sock_tenant[t.gate.sock]
        t.gate.close()
        del self.tenants[t.config.name]
        if t.executors:
            self._retired.append(t)
        try:
            os.unlink(P.broker_socket_path(self.runtime_dir, t.config.name))
        except OSError:
            pass

    def _admin_set_quota(self, msg: dict) -> dict:
        t = self.tenants.get(msg["tenant"])
        if t is None:
            raise _Refused(E.CUDA_ERROR_INVALID_VALUE, f"no tenant '{msg['tenant']}'")
        device = msg.get("device")
        if device is not None and device not in self.devices:
            raise _Refused(E.CUDA_ERROR_INVALID_DEVICE, f"no device '{device}'")
        table = {k: msg[k] for k in ("weight", "memory", "class") if k in msg}
        if "limit" in msg:
            table["limit"] = msg["limit"]
        remove_limit = "limit" in table and table["limit"] <= 0
        if remove_limit:
            del table["limit"]
        try:
            base = t.config.quota_for(device) if device else t.config.quota
            q = cfg._quota("brokerctl", f"tenant '{t.config.name}'", table, base, len(self.devices))
        except cfg.ConfigError as e:
            raise _Refused(E.CUDA_ERROR_INVALID_VALUE, str(e)) from None
        if remove_limit:
            q = dataclasses.replace(q, limit=None)
        if device:
            per = dict(t.config.per_device, **{device: q})
            t.config = dataclasses.replace(t.config, per_device=per)
        else:
            per = {d: dataclasses.replace(pq, **{f: getattr(q, f) for f in ("weight", "limit", "klass", "memory")
                                                 if getattr(q, f) != getattr(t.config.quota, f)})
                   for d, pq in t.config.per_device.items()}
            t.config = dataclasses.replace(t.config, quota=q, per_device=per)
        self._apply_quota(t)
        return {"tenant": t.config.name}

    def _bucket_for(self, t: TenantState, device: str) -> LimitBucket:
        """The limit credit `device` draws on, its rate brought up to date."""
        limit = t.config.quota_for(device).limit
        key = (t.config.name, device if limit != t.config.quota.limit else None)
        now = time.monotonic_ns()
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = LimitBucket(limit, int(self.settings.quantum_ms * 1e6),
                                                last_ns=now)
        elif b.rate != limit:
            b.set_rate(limit, now)
        return b

    def _apply_quota(self, t: TenantState) -> None:
        """Push a tenant's (changed) quota to the scheduler and its executors, live."""
        for dname, sched in self.schedulers.items():
            q = t.config.quota_for(dname)
            e = sched.entities.get(t.config.name)
            if e is not None:
                e.weight, e.klass = q.weight, q.klass
                e.bucket = self._bucket_for(t, dname)
            ex = t.executors.get(dname)
            if ex is not None:
                self._control_send(ex, "set_quota", memory=self._memory_limit(q, ex.device))
            self._schedule(dname)


class _Refused(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message


def _own_tenant_dir(d: str, owner: tuple[int, int] | None) -> None:
    """A tenant's directory: 0700, owned by the uid its containers run as (root if none), so
    only they (and root) reach its sockets and shared-memory files."""
    os.makedirs(os.path.join(d, "shm"), exist_ok=True)
    uid, gid = owner if owner is not None else (os.getuid(), os.getgid())
    for path in (d, os.path.join(d, "shm")):
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)


def _exit_reason(rc: int) -> str:
    if rc == -signal.SIGSYS:   # the CPU backend's seccomp sandbox (kubecash.broker.sandbox)
        return ("killed by SIGSYS: the sandbox refused a system call made by a kernel (kernels "
                "may not open files, create sockets, start programs or make other host system calls)")
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"
