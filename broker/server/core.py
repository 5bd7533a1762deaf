"""The Broker itself: the control plane of one node, composed of the rooms next to it
(tenants, executors, leases, admin, dynamic). Here: its state, start (runtime directory and sockets),
the serve loop, the per-pass housekeeping, publishing (metrics, systemd status) and close.

The loop follows the Majordomo pattern (poll with the heartbeat interval, purge dead peers
each pass) with monotonic deadlines, no assertions on network input, and each session's
in-flight requests tracked so that a dead executor or session fails them cleanly.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import time

import zmq

from kubecash import native
from kubecash.client.errors import CudaError, map_exceptions

from .. import config as cfg
from .. import confine, metrics, state
from ..devices import NodeDevice, discover
from ..notify import Notifier
from ..scheduler import NS, DeviceScheduler, LimitBucket
from .admin import AdminService
from .cache import CACHE_TRIM_INTERVAL_S, trim_cache
from .dynamic import DynamicTenants
from .executors import EXECUTOR_STOP_TIMEOUT_S, ExecutorControl, ExecutorProc
from .leases import LeaseScheduling
from .readiness import TenantSockets
from .tenants import ClientSession, TenantService, TenantState, clear_tenant_dir

log = logging.getLogger("kubecash.broker")
STATUS_INTERVAL_S = 1.0       # systemd STATUS= refresh
SWEEP_INTERVAL_S = 0.01       # session expiry and executor reaping


class Broker(TenantService, ExecutorControl, LeaseScheduling, AdminService, DynamicTenants):
    def __init__(self, config: cfg.Config, devices: list[NodeDevice] | None = None):
        self.config = config
        self.settings = config.broker
        self.devices = {d.name: d for d in (devices if devices is not None
                                                  else discover(config.broker.cpu_devices))}
        self.runtime_dir = os.path.abspath(self.settings.runtime_dir)
        self.private_dir = os.path.join(self.runtime_dir, "private")
        self.jail_dir = os.path.join(self.private_dir, "jail")
        self._allocated_uids: dict[str, int] = {}   # tenant -> its executors' uid (no owner)
        # self.config holds the file's tenants and these (dynamic.py), whose names never collide
        self.dynamic: dict[str, cfg.Tenant] = {}
        self.state_path = state.path_in(self.settings.state_dir)
        self.state_problem: dict | None = None       # an unusable state file, set aside at start
        self.ctx = zmq.Context()
        self.tenants: dict[str, TenantState] = {}
        self.sessions: dict[bytes, ClientSession] = {}
        self.stopping = False
        self.reload_requested = False          # set by SIGHUP; acted on in the loop
        self._next_trim = 0.0                  # first pass trims the compiled-kernel cache
        self._next_sweep = 0.0
        self._retired: list[TenantState] = []  # removed by a reload, executors still exiting
        self.poller = zmq.Poller()
        self.tenant_sockets = TenantSockets()      # which tenants to read, O(active)
        self._connected: set[TenantState] = set()  # tenants with connections: swept at housekeeping
        self.executors_running: set[ExecutorProc] = set()   # started and not yet gone
        self._ctl_fds: dict[int, ExecutorProc] = {}        # control socketpair fds
        self._lease_fds: dict[int, ExecutorProc] = {}      # lease socketpair fds
        self._err_fds: dict[int, ExecutorProc] = {}        # executors' stderr pipes
        self._closed = False
        self.libdir: str | None = None             # the native libraries' published copy
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
        self._load_dynamic()         # before: its tenants' directories stay too
        for name in os.listdir(tenants_root):
            if name not in self.config.tenants:
                self._remove_tenant_dir(name)
                continue
            clear_tenant_dir(self.runtime_dir, name)
        os.makedirs(self.settings.resolved_cache_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.settings.resolved_cache_dir, "tenants"), mode=0o700, exist_ok=True)
        # Executors mount their own view here, each in its own mount namespace.
        os.makedirs(self.jail_dir, mode=0o700, exist_ok=True)
        try:        # where CDI specs mount the native driver libraries from
            self.libdir = native.publish(os.path.join(self.runtime_dir, "lib"))
        except OSError as e:
            self.libdir = None
            log.error("the native libraries are not published in %s/lib: %s; CDI specs leave them out",
                      self.runtime_dir, e)
        if self.libdir is None:
            log.warning("the native libraries (libcuda.so.1, libnvidia-ml.so.1) are not built; CDI specs "
                        "leave them out")
        if not confine.can_confine():
            log.warning("the broker is not root: executors run as its uid, with the host's view "
                        "of files (README, \"Sandbox\")")
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
        self.poller.register(self.tenant_sockets.fileno(), zmq.POLLIN)
        now = time.monotonic_ns()
        for sched in self.schedulers.values():
            sched.created_ns = now
        for t in self.config.tenants.values():
            self._add_tenant(t)
        self._warn_shared_owners(self.config)
        log.info("serving %d tenant(s) on %s; devices: %s", len(self.tenants), self.runtime_dir,
                 ", ".join(self.devices))

    @staticmethod
    def _warn_shared_owners(config: cfg.Config) -> None:
        for uid, names in cfg.shared_owners(config).items():
            log.warning("tenants %s share owner uid %d: their containers and executors are not "
                        "isolated from each other", ", ".join(names), uid)

    def serve_forever(self) -> None:
        self.start()
        if self.settings.metrics_address:
            served = metrics.serve(self.settings.metrics_address, self.collector)
            if served:
                self._metrics_server, self.metrics_address = served
                self.poller.register(self.collector.wake_fd(), zmq.POLLIN)
        self.notifier.ready(self._status_line())
        next_status = time.monotonic() + STATUS_INTERVAL_S
        try:
            while not self.stopping:
                if self.reload_requested:
                    self.reload_requested = False
                    self.notifier.reloading()
                    try:
                        with map_exceptions("reload", logger=log):   # a bad file never ends the broker
                            self.reload()
                    except CudaError as e:
                        log.error("%s", e.message)
                    self.notifier.ready(self._status_line())
                self.serve_once(timeout_s=min(0.1, self.settings.heartbeat_interval_s))
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + STATUS_INTERVAL_S
                    self.notifier.status(self._status_line())
                self.notifier.tick()
        finally:
            self.notifier.stopping()
            self.close()

    def _publish(self) -> None:
        """Hand a waiting scrape a fresh snapshot (it never reads live state)."""
        if self.collector.wanted():
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
        wait = self.tenant_sockets.timeout_s(time.monotonic())
        if wait is not None:
            timeout_s = min(timeout_s, wait)
        ready = self.poller.poll(max(0, math.ceil(timeout_s * 1000)))
        for t in self.tenant_sockets.collect(time.monotonic()):
            if not t.gate.sock.closed:
                self._on_gate(t)
        for sock, mask in ready:
            if isinstance(sock, int):
                if sock == self.collector.wake_fd():
                    self._publish()
                    continue
                ex = self._lease_fds.get(sock)
                if ex is not None:
                    self._on_lease(ex)
                ex = self._ctl_fds.get(sock)
                if ex is not None and mask & zmq.POLLOUT:
                    self._flush_control(ex)
                if ex is not None and mask & zmq.POLLIN:
                    self._on_control(ex)
                ex = self._err_fds.get(sock)
                if ex is not None:
                    self._on_stderr(ex)
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

    def _housekeeping(self) -> None:
        now = time.monotonic()
        # Timeouts of sessions and executors are seconds: checked every few milliseconds,
        # not on each of the thousands of passes a second that lease hand-overs make.
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._expire_sessions(now)
            self._reap_executors(now)
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + CACHE_TRIM_INTERVAL_S
            trim_cache(self.settings.resolved_cache_dir, self.settings.cache_max_bytes)
        self._enforce_kernel_time()
        for name in self.schedulers:
            self._schedule(name)

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
        self.collector.close()
        self.notifier.close()
        for t in self.tenants.values():
            self.tenant_sockets.remove(t)
            t.gate.close()
        self.tenant_sockets.close()
        self.admin.close()
        self.ctx.term()
        for name in self.tenants:           # sockets go; the (mounted) directories stay
            clear_tenant_dir(self.runtime_dir, name)
