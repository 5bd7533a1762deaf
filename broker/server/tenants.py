"""Tenants and their clients: each tenant's socket (its Gate), the sessions opened on it
(hello, heartbeat, open_device, status, close), and their end.

A session's tenant is the socket it came in on, never a name it claims. Sessions whose
heartbeats stop are purged each pass of the loop.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

import psutil
import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, ProtocolError, error_from_code, map_exceptions

from .. import config as cfg
from .. import confine
from ..config import ConfigError
from ..devices import NodeDevice
from ..gate import Gate, GateEvent

if TYPE_CHECKING:
    from .executors import ExecutorProc

log = logging.getLogger("kubecash.broker")
THROTTLE_NOTICE_S = 1.0       # "throttled" events to a tenant's clients, at most this often
ENDED_KEPT = 64                # reasons kept per tenant for sessions that ended
MAX_REPEATED_OPENS = 16       # repeats of one open waiting for an executor to start
GATE_BATCH = 64               # raw chunks read from one tenant's socket per pass
# A tenant's directory file system holds its memory quota (staging and host memory count in
# it) plus this much for what else it puts there: sockets, its containers' own files.
TENANT_FS_EXTRA_BYTES = 64 << 20


@dataclasses.dataclass
class PendingOpen:
    session: ClientSession
    ident: bytes
    req_id: int
    also: list = dataclasses.field(default_factory=list)   # (ident, req_id) of repeated opens

    def wait_again(self, ident: bytes, req_id: int, device: str) -> None:
        """A repeat of the open, answered with it; bounded (a tenant repeating it while its
        executor starts would grow this without end)."""
        if len(self.also) >= MAX_REPEATED_OPENS:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"device '{device[:64]}': {MAX_REPEATED_OPENS} repeated opens "
                                  "already wait for its executor to start")
        self.also.append((ident, req_id))

    def answer(self, gate, reply) -> None:
        """`reply(req_id)` to the open and to each repeat of it (each waits for the same)."""
        for ident, rid in [(self.ident, self.req_id), *self.also]:
            gate.send(ident, reply(rid))


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
    # why its last few sessions ended, by token: a client's heartbeat may ask before it reads
    # the session_ended event, and should hear the same reason (bounded: ENDED_KEPT)
    ended: collections.OrderedDict[bytes, str] = dataclasses.field(default_factory=collections.OrderedDict)


class TenantService:
    """The Broker's tenant side (a mixin: the state it uses is set up in core.Broker)."""

    def _executor_ids(self, t: cfg.Tenant) -> tuple[int, int]:
        """The uid:gid a tenant's executors (and compile helpers) run as: its owner, or for a
        tenant with none (or owner root) one allocated from [broker] executor_uid_min..max.
        A broker that is not root runs them as itself."""
        if not confine.can_confine():
            return os.getuid(), os.getgid()
        if t.owner is not None and t.owner[0] != 0:
            return t.owner
        uid = self._allocated_uids.get(t.name)
        if uid is None:
            uid = self._allocated_uids[t.name] = allocate_uid(
                t.name, self.settings.executor_uid_min, self.settings.executor_uid_max,
                taken={*self._allocated_uids.values(),
                       *(o.owner[0] for o in self.config.tenants.values() if o.owner is not None)})
        return uid, uid

    def _tenant_fs_bytes(self, t: cfg.Tenant) -> int:
        """Its memory quota over its devices (no more than the node's memory: a tenant with
        no quota on a GPU would otherwise get the GPUs' memory in RAM), plus the extra."""
        quota = sum(self._memory_limit(t.quota_for(name), d) for name, d in self.devices.items()
                    if t.may_use(name))
        return TENANT_FS_EXTRA_BYTES + min(quota, psutil.virtual_memory().total)

    def _tenant_fs(self, t: cfg.Tenant, ids: tuple[int, int]):
        """What gives a tenant's directory its own file system (README, "Sandbox"): mounted on
        a directory just made, resized on one that has it. None for a broker that is not
        root. A failure is logged and leaves a plain directory: the tenant still works."""
        if not confine.can_confine() or not self.settings.mount_namespace:
            return None

        def ensure(created: bool) -> None:
            d = P.tenant_dir(self.runtime_dir, t.name)
            size, ns = self._tenant_fs_bytes(t), self.settings.mount_namespace
            try:
                if confine.is_tenant_fs(d):
                    confine.resize_tenant_fs(d, size=size, namespace=ns)
                elif created:
                    confine.mount_tenant_fs(d, size=size, owner=ids, namespace=ns)
                else:   # running containers may have bound it: a mount over it would hide it
                    log.warning("tenant '%s': its directory was made by an earlier broker and has no "
                                "file system of its own; what is written there is bounded only by the "
                                "runtime file system until it is made anew (with no container using it)",
                                t.name)
            except OSError as e:
                log.warning("tenant '%s': no file system of its own for its directory (%s); what is "
                            "written there is bounded only by the runtime file system", t.name, e)
        return ensure

    def _resize_tenant_fs(self, t: cfg.Tenant) -> str | None:
        """Its directory's file system to its (new) quota: None, or why it keeps its size."""
        d = P.tenant_dir(self.runtime_dir, t.name)
        if confine.can_confine() and self.settings.mount_namespace and confine.is_tenant_fs(d):
            size = self._tenant_fs_bytes(t)
            try:
                confine.resize_tenant_fs(d, size=size, namespace=self.settings.mount_namespace)
            except OSError as e:     # smaller than what is in it now: EINVAL, the old size stays
                why = (f"its directory's file system keeps {confine.tenant_fs_size(d)} bytes, not "
                       f"{size} ({e.strerror or e}; it holds more than that now)")
                log.warning("tenant '%s': %s", t.name, why)
                return why
        return None

    def _add_tenant(self, t: cfg.Tenant) -> str | None:
        """Serve tenant `t`: None, or why it cannot be served now. A tenant's own directory
        can stop it (its containers filled it, so there is no room for its socket): the
        broker and every other tenant go on, and the next reload tries it again."""
        d = P.tenant_dir(self.runtime_dir, t.name)
        ids = self._executor_ids(t)
        try:
            _own_tenant_dir(self.runtime_dir, t.name, ids, fs=self._tenant_fs(t, ids))
            # Connecting needs write permission on the socket file; the 0700 directory (the
            # tenant's uid's) is what keeps everyone else out. 0666 from the moment it
            # exists (a umask: a chmod by path after the bind could follow a symlink).
            old_umask = os.umask(0o111)
            try:
                gate = Gate(self.ctx, f"ipc://{P.broker_socket_path(self.runtime_dir, t.name)}",
                            tenant=t.name, max_bytes=self._broker_msg_max,
                            max_connections=self.settings.max_connections_per_tenant,
                            rate=self.settings.max_requests_per_tenant_s)
            finally:
                os.umask(old_umask)
        except (OSError, zmq.ZMQError) as e:
            why = f"cannot set up its directory {d}: {e.strerror or e}"
            log.error("tenant '%s' is not served: %s (the next reload tries again)", t.name, why)
            return why
        ts = TenantState(t, gate, d)
        self.tenants[t.name] = ts
        self.tenant_sockets.add(ts)
        return None

    # -- tenant sockets -------------------------------------------------------------------
    def _on_gate(self, t: TenantState) -> None:
        """A bounded batch from one tenant's socket; a tenant past its request rate is left
        unread (back-pressure) until its budget refills."""
        for kind, ident, what in t.gate.receive(GATE_BATCH):
            if t.gate.sock.closed:          # an earlier request's reload removed the tenant
                return
            if kind is GateEvent.MESSAGE:
                self._on_tenant(t, ident, what)
            elif kind is GateEvent.REFUSED:
                t.gate.send(ident, P.error(0, E.CUDA_ERROR_INVALID_VALUE, what))
            elif kind is GateEvent.OVER_LIMIT:
                try:
                    rid = P.request_id_of(P.unpack(what, self._broker_msg_max))
                except ProtocolError:
                    rid = 0
                t.gate.send(ident, P.error(rid, E.CUDA_ERROR_NOT_PERMITTED, t.gate.over_limit_reason()))
            else:
                self._connection_closed(t, ident)
        if t.gate.sock.closed:
            return
        if t.gate.conns:
            self._connected.add(t)
        else:
            self._connected.discard(t)
        if not t.gate.paused:
            self.tenant_sockets.check(t)    # a bounded batch may have left some unread
        elif not self.tenant_sockets.paused(t):
            self.tenant_sockets.pause(t, time.monotonic())
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
            # a bug in one handler must not take the node down; tenants are told its kind only
            with map_exceptions(logger=log, detail=False):
                msg = P.unpack(frame, self._broker_msg_max)
                op = P.check(msg, P.TENANT)
                handler = getattr(self, P.handler_name(P.message(P.TENANT, op)))
                if op == "hello":
                    result = handler(t, ident, msg)
                else:
                    s = self.sessions.get(msg["session"])
                    if s is None or s.tenant is not t:
                        why = t.ended.get(msg["session"])
                        raise error_from_code(E.CUDA_ERROR_INVALID_CONTEXT,
                                              f"session ended ({why})" if why else
                                              "unknown or ended session (send hello to open one)")
                    s.last_seen = time.monotonic()
                    s.throttled_at_seen = t.gate.throttled_s(s.last_seen)
                    result = handler(s, ident, msg)
            if result is not None:
                t.gate.send(ident, P.reply(msg["id"], **result))
        except CudaError as e:
            t.gate.send(ident, P.error_reply(P.request_id_of(msg), e))

    @property
    def _broker_msg_max(self) -> int:
        return min(P.TENANT.max_bytes, self.settings.max_message_bytes)

    def _op_hello(self, t: TenantState, ident: bytes, msg: dict) -> dict:
        limit = self.settings.max_sessions_per_tenant
        if len(t.sessions) >= limit:
            raise error_from_code(E.CUDA_ERROR_NOT_PERMITTED,
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

    def _device_view(self, t: TenantState, d: NodeDevice) -> dict:
        q = t.config.quota_for(d.name)
        return {**d.describe(), "memory_limit": self._memory_limit(q, d),
                "weight": q.weight, "limit": q.limit, "class": q.klass}

    @staticmethod
    def _memory_limit(q: cfg.Quota, d: NodeDevice) -> int:
        return d.total_memory if q.memory is None else min(q.memory, d.total_memory)

    def _op_heartbeat(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        return {}

    def _op_close(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        self._end_session(s, "closed by the client")
        return {}

    def _op_status(self, s: ClientSession, ident: bytes, msg: dict) -> dict:
        """The tenant's own use, per device it has an executor on (what NVML reports inside
        its containers): share_1s, its share of the device's time over the last second; pids,
        its sessions' processes with the device open (as their hello gave them)."""
        t = s.tenant
        now = time.monotonic_ns()
        out = {}
        for name, ex in t.executors.items():
            e = self.schedulers[name].entities.get(t.config.name)
            pids = sorted({ss.pid for tok in ex.sessions if (ss := self.sessions.get(tok)) is not None and ss.pid})
            out[name] = {"memory_used": ex.memory_used, "device_ns": ex.device_ns, "kernels": ex.kernels,
                         "pid": ex.proc.pid, "pids": pids,
                         "share_1s": self.schedulers[name].shares(e, now)["1s"] if e else 0.0}
        return {"tenant": t.config.name, "sessions": len(t.sessions), "devices": out}

    def _op_open_device(self, s: ClientSession, ident: bytes, msg: dict) -> dict | None:
        name = msg["device"]
        t = s.tenant
        d = self.devices.get(name)
        if d is None or not t.config.may_use(name):
            raise error_from_code(E.CUDA_ERROR_INVALID_DEVICE,
                           f"device '{name[:64]}' is not available to tenant '{t.config.name}'")
        if name in s.failed:
            code, why = s.failed[name]
            raise error_from_code(code, why)
        ex = t.executors.get(name)
        if ex is not None and ex.stopping is not None:
            # It is exiting and will not take the session; the next executor will.
            waiting = t.waiting_opens.setdefault(name, {})
            if s.token in waiting:
                waiting[s.token].wait_again(ident, msg["id"], name)
            else:
                waiting[s.token] = PendingOpen(s, ident, msg["id"])
            return None
        if ex is None:
            ex = self._spawn_executor(t, d)
        if s.token in ex.sessions:
            return self._open_reply(ex)
        if s.token in ex.pending:           # asked again before the first was answered
            ex.pending[s.token].wait_again(ident, msg["id"], name)
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
        t.ended[s.token] = why
        if len(t.ended) > ENDED_KEPT:
            t.ended.popitem(last=False)
        log.info("tenant %s: session %s ended (%s)", t.config.name, s.token.hex()[:8], why)
        # Its opens still waiting for an executor are answered now: none will be later (a
        # client that stopped heartbeating while its executor started would wait forever).
        opens = [*t.waiting_opens.values(), *(ex.pending for ex in t.executors.values())]
        for p in [o.pop(s.token) for o in opens if s.token in o]:
            p.answer(t.gate, lambda rid: P.error(rid, E.CUDA_ERROR_INVALID_CONTEXT, f"session ended ({why})"))
        for ex in list(t.executors.values()):
            if s.token in ex.sessions:
                ex.sessions.discard(s.token)
                self._control_send(ex, "session_end", session=s.token)
            if not ex.sessions and not ex.pending and not t.sessions:
                self._stop_executor(ex)

    def _expire_sessions(self, now: float) -> None:
        timeout = self.settings.heartbeat_timeout_s
        for t in list(self._connected):           # connections whose peer left unannounced
            if not t.gate.paused:                   # a throttled tenant is not being read
                for ident in t.gate.sweep(now, timeout, {s.ident for s in t.sessions.values()}):
                    self._connection_closed(t, ident)
                if not t.gate.conns:
                    self._connected.discard(t)
        # Silence counts only while the broker was reading: a tenant over its request rate
        # is left unread, and its sessions must not expire for that.
        for s in [s for s in self.sessions.values()
                  if now - s.last_seen - (s.tenant.gate.throttled_s(now) - s.throttled_at_seen) > timeout]:
            self._end_session(s, f"no heartbeat for {timeout:g} s")


# A tenant owns its directory and may put anything in it (a symlink where shm/ was, say), so
# root acts there only through descriptors: each directory is opened with O_NOFOLLOW from
# its root-owned parent, and entries are changed relative to it (fchown, fchmod, unlinkat).

def _tenants_root_fd(runtime_dir: str) -> int:
    return os.open(os.path.join(runtime_dir, "tenants"), confine.DIR_NOFOLLOW)


def _own_tenant_dir(runtime_dir: str, name: str, ids: tuple[int, int], *, fs=None) -> None:
    """A tenant's directory and its shm/: 0700, owned by `ids` (the uid its executors run
    as, which is its containers' uid where it has an owner), so only they (and root)
    reach its sockets and shared-memory files. Anything in shm/'s place is replaced.
    `fs(created)`, before shm/ is made: gives the directory its file system."""
    root = _tenants_root_fd(runtime_dir)
    try:
        try:
            os.close(confine.open_dir_nofollow(root, name))
            created = False
        except OSError:
            created = True
        d = confine.open_dir_nofollow(root, name, create_mode=0o700)
        if fs is not None:
            os.close(d)
            fs(created)
            d = confine.open_dir_nofollow(root, name, create_mode=0o700)
        try:
            shm = confine.open_dir_nofollow(d, "shm", create_mode=0o700)
            for fd in (d, shm):
                os.fchown(fd, *ids)
                os.fchmod(fd, 0o700)
            os.close(shm)
        finally:
            os.close(d)
    finally:
        os.close(root)


def clear_tenant_dir(runtime_dir: str, name: str, *, sockets: tuple[str, ...] | None = None,
                     shm_prefix: str | None = "") -> None:
    """Remove what brokers and executors leave in a tenant's directory: the sockets named in
    `sockets` (None: every *.sock) and the shm/ files whose names start with `shm_prefix`
    (None: none).
    Entries are unlinked relative to their directory, so a symlink is removed, never followed."""
    try:
        root = _tenants_root_fd(runtime_dir)
    except OSError:
        return
    try:
        d = confine.open_dir_nofollow(root, name)
    except OSError:
        os.close(root)
        return
    try:
        for entry in os.listdir(d) if sockets is None else sockets:
            if entry.endswith(".sock"):
                _unlink_at(d, entry)
        if shm_prefix is None:
            return
        try:
            shm = confine.open_dir_nofollow(d, "shm")
        except OSError:
            return                      # none, or not a directory: nothing of ours in it
        try:
            for entry in os.listdir(shm):
                if entry.startswith(shm_prefix):
                    _unlink_at(shm, entry)
        finally:
            os.close(shm)
    finally:
        os.close(d)
        os.close(root)


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def allocate_uid(name: str, lo: int, hi: int, taken: set[int]) -> int:
    """A uid for tenant `name` in [lo, hi] not in `taken`: where its name hashes to, or the
    next free one, so a tenant keeps its uid across restarts while the set of tenants does."""
    size = hi - lo + 1
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % size
    for i in range(size):
        uid = lo + (start + i) % size
        if uid not in taken:
            return uid
    raise ConfigError(f"[broker] executor_uid_min..executor_uid_max ({lo}..{hi}) has no uid left "
                      f"for tenant '{name}'")
