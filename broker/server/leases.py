"""Device time: the lease socketpair of each executor (wants and releases in, grants and
preemptions out), handing the device to the next holder, the limit credit buckets, and the
max_kernel_seconds bound on a lease.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kubecash.client import protocol as P
from kubecash.client.errors import ProtocolError

from ..scheduler import NS, LimitBucket

if TYPE_CHECKING:
    from .executors import ExecutorProc
    from .tenants import TenantState

log = logging.getLogger("kubecash.broker")


class LeaseScheduling:
    """The Broker's scheduling side (a mixin: the state it uses is set up in core.Broker)."""

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
                handler, msg = P.handler_for(self, P.LEASE_REPORT, frame)
            except ProtocolError as e:
                log.error("bad lease message from %s/%s: %s", ex.tenant.config.name, ex.device.name, e)
                continue
            handler(ex, msg, time.monotonic_ns())
            self._schedule(ex.device.name)

    def _on_lease_report_want(self, ex: ExecutorProc, msg: dict, now: int) -> None:
        sched = self.schedulers[ex.device.name]
        preempt = sched.want(ex.tenant.config.name, now)
        if sched.holder is not None and sched.holder.tenant != ex.tenant.config.name:
            hx = self.tenants[sched.holder.tenant].executors.get(ex.device.name)
            if hx is not None and preempt:
                self._lease_send(hx, "preempt", lease=sched.lease)
            elif hx is not None and sched.contended_told != sched.lease and sched.contended(now):
                # once per lease, and only for a wanter that may run now (one over its limit
                # would leave the device idle): the holder stops renewing
                sched.contended_told = sched.lease
                self._lease_send(hx, "contended", lease=sched.lease)

    def _on_lease_report_renew(self, ex: ExecutorProc, msg: dict, now: int) -> None:
        sched = self.schedulers[ex.device.name]
        if sched.renew(ex.tenant.config.name, msg["lease"], msg["used_ns"], msg["kernels"], now) is False:
            self._lease_send(ex, "preempt", lease=msg["lease"])

    def _on_lease_report_release(self, ex: ExecutorProc, msg: dict, now: int) -> None:
        sched = self.schedulers[ex.device.name]
        held_ns = now - sched.lease_start
        if sched.release(ex.tenant.config.name, msg["lease"], msg["used_ns"], msg["kernels"], msg["more"], now):
            # a kernel preempted mid-grid keeps counting toward max_kernel_seconds
            ex.kernel_carry_ns = ex.kernel_carry_ns + held_ns if msg.get("suspended") else 0

    def _lease_send(self, ex: ExecutorProc, op: str, **fields: Any) -> None:
        if ex.lease_sock is not None:
            try:
                ex.lease_sock.send(P.notice(op, **fields))
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
        # Renewable: with no limit to hold it to, the holder goes on past its quantum while
        # no one else wants the device (a hand-over idles the device: two process wake-ups).
        self._lease_send(ex, "grant", lease=g.lease, quantum_ns=g.quantum_ns,
                         preemptible=preemptible, renewable=g.entity.bucket.rate is None,
                         contended=sched.contended(time.monotonic_ns()))

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
