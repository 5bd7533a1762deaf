"""The operator's socket (what brokerctl talks to) and its requests: status, evict, drain,
reload, set_quota; and what a reload or a quota change does to the tenants running now.
(Dynamic tenants' requests, and their state file, are in dynamic.py.)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import CudaError, E, error_from_code, map_exceptions

from .. import config as cfg
from .. import confine
from ..executor.accounting import bound_memory
from ..scheduler import NS
from .tenants import TenantState, _own_tenant_dir

log = logging.getLogger("kubecash.broker")


class AdminService:
    """The Broker's operator side (a mixin: the state it uses is set up in core.Broker)."""

    def _on_admin(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident, frame = frames
        msg: Any = None
        try:
            with map_exceptions(logger=log):
                msg = P.unpack(frame, P.ADMIN.max_bytes)
                op = P.check(msg, P.ADMIN)
                result = getattr(self, P.handler_name(P.message(P.ADMIN, op)))(msg)
            self._send(self.admin, ident, P.reply(msg["id"], **result))
        except CudaError as e:
            self._send(self.admin, ident, P.error_reply(P.request_id_of(msg), e))

    @staticmethod
    def _send(sock: zmq.Socket, ident: bytes, payload: bytes) -> None:
        try:
            sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone or not reading; heartbeats will tell

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
                             "throttled": t.gate.paused, "directory": _directory_use(t.dir),
                             "source": "dynamic" if name in self.dynamic else "file"}
        return {"devices": devices, "tenants": tenants, "uptime_s": (now - self.started_ns) / NS,
                "quantum_ms": self.settings.quantum_ms, "runtime_dir": self.runtime_dir,
                "metrics_address": self.metrics_address, "config": self.config.path,
                "state": self._state_status(), "libdir": self.libdir}

    def _admin_evict(self, msg: dict) -> dict:
        """End every session of a tenant now; its executors exit and free everything."""
        t = self.tenants.get(msg["tenant"])
        if t is None:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, f"no tenant '{msg['tenant']}'")
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
            raise error_from_code(E.CUDA_ERROR_INVALID_DEVICE, f"no device '{msg['device']}'")
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
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                           f"reload refused, the running configuration stays: {e}") from None
        taken = sorted(set(new.tenants) & set(self.dynamic))
        if taken:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"reload refused, the running configuration stays: {self.config.path}: "
                                  + ", ".join(f"tenant '{n}'" for n in taken) + " is a dynamic tenant "
                                  "(brokerctl tenant remove it first, or name the file's tenant otherwise)")
        new = dataclasses.replace(new, tenants={**new.tenants, **self.dynamic})
        self._warn_shared_owners(new)
        restart_only = ("runtime_dir", "cache_dir", "max_message_bytes", "metrics_address",
                        "admin_socket", "mount_namespace", "state_dir", "cpu_devices")
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
        warnings = []
        for name in added:
            why = self._add_tenant(new.tenants[name])
            if why is not None:
                warnings.append(f"tenant '{name}' is not served: {why}")
        for name, t in self.tenants.items():
            if name not in added and t.config != new.tenants[name]:
                warnings += self._change_tenant(t, new.tenants[name])
        log.info("configuration reloaded from %s: %d tenants (added %s, removed %s)%s",
                 self.config.path, len(self.tenants), added or "none", removed or "none",
                 f"; {', '.join(pending)} take effect at restart" if pending else "")
        return {"tenants": sorted(self.tenants), "added": [n for n in added if n in self.tenants],
                "removed": removed, "restart_needed_for": pending, "warnings": warnings}

    def _change_tenant(self, t: TenantState, new: cfg.Tenant) -> list[str]:
        """A served tenant's definition changed (a reload, a dynamic tenant replaced): applied
        live; what did not follow, and why."""
        warnings = []
        name = t.config.name
        if t.config.owner != new.owner:       # executors: next start
            self._allocated_uids.pop(name, None)
            try:
                _own_tenant_dir(self.runtime_dir, name, self._executor_ids(new))
            except OSError as e:
                warnings.append(f"tenant '{name}': its directory keeps its owner ({e})")
                log.warning("%s", warnings[-1])
        t.config = new
        why = self._apply_quota(t)
        if why is not None:
            warnings.append(f"tenant '{name}': {why}")
        return warnings

    def _retire_tenant(self, t: TenantState, why: str = "removed from the broker's configuration") -> int:
        """A tenant removed (from the configuration, or by the operator): its sessions end
        cleanly, its executors stop, its socket goes. How many sessions ended."""
        ended = len(t.sessions)
        for s in list(t.sessions.values()):
            t.gate.send(s.ident, P.event("session_ended", code=int(E.CUDA_ERROR_DEINITIALIZED),
                                                error=f"tenant '{t.config.name}' was {why}"))
            self._end_session(s, f"tenant {why}")
        for sched in self.schedulers.values():
            sched.forget(t.config.name)
        for ex in list(t.executors.values()):
            self._stop_executor(ex)
        self.tenant_sockets.remove(t)
        self._connected.discard(t)
        t.gate.close()
        del self.tenants[t.config.name]
        if t.executors:
            self._retired.append(t)
        try:
            os.unlink(P.broker_socket_path(self.runtime_dir, t.config.name))
        except OSError:
            pass
        return ended

    def _admin_set_quota(self, msg: dict) -> dict:
        t = self.tenants.get(msg["tenant"])
        if t is None:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, f"no tenant '{msg['tenant']}'")
        device = msg.get("device")
        if device is not None and device not in self.devices:
            raise error_from_code(E.CUDA_ERROR_INVALID_DEVICE, f"no device '{device}'")
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
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, str(e)) from None
        if remove_limit:
            q = dataclasses.replace(q, limit=None)
        if device:
            per = dict(t.config.per_device, **{device: q})
            changed = dataclasses.replace(t.config, per_device=per)
        else:
            per = {d: dataclasses.replace(pq, **{f: getattr(q, f) for f in ("weight", "limit", "klass", "memory")
                                                 if getattr(q, f) != getattr(t.config.quota, f)})
                   for d, pq in t.config.per_device.items()}
            changed = dataclasses.replace(t.config, quota=q, per_device=per)
        if t.config.name in self.dynamic:      # kept in the state file first: a restart keeps it
            self._commit_dynamic({**self.dynamic, t.config.name: changed})
        t.config = changed
        why = self._apply_quota(t)
        return {"tenant": t.config.name, "warnings": [why] if why else []}

    def _apply_quota(self, t: TenantState) -> str | None:
        """Push a tenant's (changed) quota to the scheduler and its executors, live; None, or
        what did not follow it (its directory's file system holds more than the new size)."""
        for dname, sched in self.schedulers.items():
            q = t.config.quota_for(dname)
            e = sched.entities.get(t.config.name)
            if e is not None:
                e.weight, e.klass = q.weight, q.klass
                e.bucket = self._bucket_for(t, dname)
            ex = t.executors.get(dname)
            if ex is not None:
                memory = self._memory_limit(q, ex.device)
                if confine.can_confine():     # its hard limit is locked: only root moves it
                    bound_memory(ex.device.kind, memory, pid=ex.proc.pid, lock=True)
                self._control_send(ex, "set_quota", memory=memory)
            self._schedule(dname)
        return self._resize_tenant_fs(t.config)


def _directory_use(d: str) -> dict[str, Any] | None:
    """What a tenant's directory holds, and its bound where it has a file system of its own."""
    try:
        st, parent, fs = os.stat(d), os.stat(os.path.dirname(d)), os.statvfs(d)
    except OSError:
        return None
    if st.st_dev == parent.st_dev:       # a plain directory: its use is the runtime file system's
        return {"own_file_system": False}
    return {"own_file_system": True, "bytes_used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
            "bytes_max": fs.f_blocks * fs.f_frsize, "files_used": fs.f_files - fs.f_ffree,
            "files_max": fs.f_files}
