"""Time-slice scheduler: cgroup-v2 style time quotas per device, enforced through leases.

On each device at most one executor runs tenant work at a time: the holder of the device's
lease. The broker grants a lease for a quantum; the executor runs its queue while it holds
it, stops issuing work when the quantum is spent (or it is preempted, or it runs dry), and
reports the device time it actually used. That measured time is charged:

- weight (1-10000): each (tenant, device) has a virtual time, advanced by used/weight. The
  next holder is the runnable entity with the least virtual time; an entity that wakes up
  from idle keeps at most WAKE_CREDIT_NS of lag behind the device's minimum virtual time,
  so a short pause keeps its share and a long idle is not banked (work-conserving, like
  CFS). That minimum only moves forward (CFS's min_vruntime): measured from the lowest
  runnable entity instead, each waker could be placed below the last, and a burst of them
  ratcheted the floor down by WAKE_CREDIT_NS apiece, locking out for seconds a tenant
  that had just run alone.
  Overruns (a kernel longer than the quantum) are charged in full, so shares hold over time
  whatever the kernel length.
- limit (0.0001 and up, a fraction of one device's time; above 1 it spans devices): a
  credit per tenant that accrues at rate `limit` and is spent by measured device time. A
  tenant may take a lease only while its credit is positive; debt from an overrun is repaid
  before it runs again. Credit is capped at one period's budget, where the period is
      P = max(100 ms, quantum / limit)
  so a tenant's budget per period, limit * P, is at least one quantum: even 0.0001 of a
  device gets whole kernels (one 10 ms quantum every 100 s). A limit holds to within one
  kernel's time per window; the README gives the windows.
- class: a runnable `latency` entity is chosen before `batch` ones (unless its virtual time
  is more than LATENCY_SLACK ahead, so a saturating latency tenant still only gets its
  weighted share), and the batch holder is asked to stop at its next kernel boundary.

This module is pure logic (no sockets, no clock reads): the broker feeds it events with
timestamps, which makes it testable and lets benchmarks replay it.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools

NS = 1_000_000_000
MIN_PERIOD_NS = 100_000_000          # 100 ms
LATENCY_SLACK_NS = 50_000_000        # weighted ns a latency tenant may run ahead of batch
WAKE_CREDIT_NS = 50_000_000          # weighted ns of lag an entity keeps across a short idle
WINDOWS_S = (1, 10, 60)
HISTORY_BUCKET_NS = 100_000_000      # shares are summed from 100 ms buckets
WAIT_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass
class LimitBucket:
    """A tenant's hard cap: credit accrues at `rate` device-ns per ns, capped at one period."""
    rate: float | None               # None: no limit
    quantum_ns: int
    credit_ns: float = 0.0
    last_ns: int | None = None

    @property
    def cap_ns(self) -> float:
        if self.rate is None:
            return float("inf")
        return self.rate * max(MIN_PERIOD_NS, self.quantum_ns / self.rate)

    @property
    def period_ns(self) -> float:
        return 0.0 if self.rate is None else max(MIN_PERIOD_NS, self.quantum_ns / self.rate)

    def refill(self, now: int) -> None:
        if self.rate is not None and self.last_ns is not None:
            self.credit_ns = min(self.cap_ns, self.credit_ns + (now - self.last_ns) * self.rate)
        self.last_ns = now

    def eligible(self, now: int) -> bool:
        if self.rate is None:
            return True
        self.refill(now)
        return self.credit_ns > 0

    def charge(self, used_ns: int, now: int) -> None:
        if self.rate is not None:
            self.refill(now)
            self.credit_ns -= used_ns

    def ns_until_eligible(self, now: int) -> float:
        if self.rate is None:
            return 0.0
        self.refill(now)
        return 0.0 if self.credit_ns > 0 else (-self.credit_ns) / self.rate + 1

    def set_rate(self, rate: float | None, now: int) -> None:
        self.refill(now)
        self.rate = rate
        if rate is not None:
            self.credit_ns = min(self.credit_ns, self.cap_ns)


@dataclasses.dataclass
class Entity:
    """One tenant on one device, as the scheduler sees it."""
    tenant: str
    device: str
    weight: int
    klass: str
    bucket: LimitBucket
    vtime: float = 0.0
    runnable: bool = False
    want_since: int | None = None
    used_ns: int = 0                  # device time charged, all time
    kernels: int = 0
    grants: int = 0
    wait_ns: int = 0                  # time spent runnable waiting for a lease
    wait_counts: list = dataclasses.field(default_factory=lambda: [0] * len(WAIT_BOUNDS_S))
    history: collections.deque = dataclasses.field(default_factory=collections.deque)  # (t, used)
    active: bool = True               # an executor is there to take leases


@dataclasses.dataclass
class Grant:
    entity: Entity
    lease: int
    quantum_ns: int


class DeviceScheduler:
    def __init__(self, device: str, quantum_ns: int):
        self.device = device
        self.quantum_ns = quantum_ns
        self.entities: dict[str, Entity] = {}
        self.holder: Entity | None = None
        self.lease: int | None = None
        self.lease_start: int = 0
        self.draining = False         # no new leases (brokerctl drain)
        self._leases = itertools.count(1)
        self.created_ns: int | None = None
        self.busy_ns = 0              # sum of charged device time
        self.min_vtime = 0.0          # forward-only: wakers are placed relative to it
        self.contended_told: int | None = None   # the lease whose holder was told "contended"

    # -- membership ------------------------------------------------------------------------
    def add(self, tenant: str, weight: int, klass: str, bucket: LimitBucket) -> Entity:
        """A tenant's executor for this device is ready. Its accounting (device time,
        kernels, histograms) carries over from its earlier executors: counters only grow."""
        e = self.entities.get(tenant)
        self._advance_min_vtime()
        if e is None:
            e = self.entities[tenant] = Entity(tenant, self.device, weight, klass, bucket)
        e.weight, e.klass, e.bucket = weight, klass, bucket
        e.active, e.runnable, e.want_since = True, False, None
        e.vtime = max(e.vtime, self.min_vtime)
        return e

    def remove(self, tenant: str) -> None:
        """Its executor is gone or going: no more leases (the accounting stays)."""
        e = self.entities.get(tenant)
        if e is not None:
            e.active, e.runnable, e.want_since = False, False, None
            if self.holder is e:
                self.holder, self.lease = None, None

    def forget(self, tenant: str) -> None:
        """The tenant left the configuration."""
        self.remove(tenant)
        self.entities.pop(tenant, None)

    def _advance_min_vtime(self) -> None:
        """Up to the least virtual time of those running or runnable, never back."""
        current = [e.vtime for e in self.entities.values() if e.runnable or e is self.holder]
        if current:
            self.min_vtime = max(self.min_vtime, min(current))

    # -- events --------------------------------------------------------------------------
    def want(self, tenant: str, now: int) -> bool:
        """`tenant` has work queued. Returns True when the holder should be preempted."""
        e = self.entities.get(tenant)
        if e is None or not e.active or e.runnable or e is self.holder:
            return False
        # Clients go idle for a moment between batches (a synchronize round trip): keep a
        # bounded lag so that does not cost them their share, without banking long idles.
        self._advance_min_vtime()
        e.vtime = max(e.vtime, self.min_vtime - WAKE_CREDIT_NS)
        e.runnable = True
        e.want_since = now
        h = self.holder
        return (h is not None and e.klass == "latency" and h.klass == "batch"
                and e.bucket.eligible(now))

    def release(self, tenant: str, lease: int, used_ns: int, kernels: int, more: bool,
                now: int) -> bool:
        """The holder gives the lease back after using `used_ns`. False if it is stale."""
        e = self.entities.get(tenant)
        if e is None or e is not self.holder or lease != self.lease:
            return False
        # The executor's measurement, held to what the broker saw: it runs tenant code, so it
        # may claim neither more than the lease lasted nor less than half of it. (Not less
        # than the whole lease minus a fixed slack: on a shared VM an executor idle for seconds
        # can take several ms to wake, and charging that would overcharge sparse tenants.)
        held = now - self.lease_start
        self.charge(e, min(max(used_ns, held // 2), held), kernels, now)
        self._advance_min_vtime()       # with the holder's new virtual time in it
        self.holder, self.lease = None, None
        if more:
            e.runnable = True
            e.want_since = now
        return True

    def renew(self, tenant: str, lease: int, used_ns: int, kernels: int, now: int) -> bool | None:
        """The holder spent a quantum of an uncontended lease and goes on: charged as a
        release and a grant would charge it, without the hand-over. True if it may go on,
        False if it must release now (someone else may run, it is over its limit, the device
        drains), None if the lease is stale."""
        e = self.entities.get(tenant)
        if e is None or e is not self.holder or lease != self.lease:
            return None
        held = now - self.lease_start
        self.charge(e, min(max(used_ns, held // 2), held), kernels, now)
        self.lease_start = now
        self._advance_min_vtime()
        return not (self.draining or e.bucket.rate is not None or self.contended(now))

    def contended(self, now: int) -> bool:
        """Whether anyone but the holder may run now."""
        return any(x.runnable and x is not self.holder and x.bucket.eligible(now)
                   for x in self.entities.values())

    def charge(self, e: Entity, used_ns: int, kernels: int, now: int) -> None:
        used_ns = max(0, int(used_ns))
        e.used_ns += used_ns
        e.kernels += kernels
        e.vtime += used_ns * 100 / e.weight      # in ns at the default weight
        e.bucket.charge(used_ns, now)
        self.busy_ns += used_ns
        bucket = now - now % HISTORY_BUCKET_NS     # bounded history: 600 buckets per minute
        if e.history and e.history[-1][0] == bucket:
            e.history[-1] = (bucket, e.history[-1][1] + used_ns)
        else:
            e.history.append((bucket, used_ns))
        horizon = now - WINDOWS_S[-1] * NS
        while e.history and e.history[0][0] < horizon:
            e.history.popleft()

    def next_grant(self, now: int) -> Grant | None:
        """If the device is free, choose the next holder and lease it the device."""
        if self.holder is not None or self.draining:
            return None
        candidates = [e for e in self.entities.values() if e.runnable and e.bucket.eligible(now)]
        if not candidates:
            return None
        batch_min = min((e.vtime for e in candidates if e.klass != "latency"), default=None)
        urgent = [e for e in candidates if e.klass == "latency" and
                  (batch_min is None or e.vtime <= batch_min + LATENCY_SLACK_NS)]
        e = min(urgent or candidates, key=lambda x: x.vtime)
        quantum = self.quantum_ns
        if e.bucket.rate is not None:
            quantum = max(1, min(quantum, int(e.bucket.credit_ns)))
        e.runnable = False
        if e.want_since is not None:
            waited = now - e.want_since
            e.wait_ns += waited
            i = bisect.bisect_left(WAIT_BOUNDS_S, waited / NS)
            if i < len(WAIT_BOUNDS_S):     # beyond the last bound: counted in +Inf only
                e.wait_counts[i] += 1
            e.want_since = None
        e.grants += 1
        self.holder, self.lease, self.lease_start = e, next(self._leases), now
        return Grant(e, self.lease, quantum)

    def ns_until_next_eligible(self, now: int) -> float | None:
        """When nothing is eligible but someone is runnable: how long until one is."""
        if self.draining:
            return None                     # nothing will be granted: no reason to wake
        waits = [e.bucket.ns_until_eligible(now) for e in self.entities.values() if e.runnable]
        return min(waits) if waits else None

    # -- accounting ----------------------------------------------------------------------
    def queue_wait(self, e: Entity) -> dict:
        """The queue-wait histogram: per-bucket counts (not cumulative), sum, count."""
        return {"bounds": list(WAIT_BOUNDS_S), "counts": list(e.wait_counts),
                "sum": e.wait_ns / NS, "count": e.grants}

    def shares(self, e: Entity, now: int) -> dict[str, float]:
        """Share of the device achieved over sliding windows of 1, 10 and 60 s."""
        out = {}
        for w in WINDOWS_S:
            span = min(w * NS, now - (self.created_ns or now)) or 1
            used = sum(u for t, u in e.history if t >= now - w * NS)
            out[f"{w}s"] = used / span
        return out


def expected_shares(quotas: dict[str, tuple[int, float | None]], capacity: float = 1.0) -> dict[str, float]:
    """What saturating tenants should get of one device: shares by weight, capped by limit,
    the excess redistributed among the uncapped (water-filling)."""
    left = dict(quotas)
    share: dict[str, float] = {}
    cap_left = capacity
    while left:
        total_w = sum(w for w, _ in left.values())
        capped = {t: lim for t, (w, lim) in left.items()
                  if lim is not None and lim < cap_left * w / total_w}
        if not capped:
            for t, (w, _) in left.items():
                share[t] = cap_left * w / total_w
            break
        for t, lim in capped.items():
            share[t] = lim
            cap_left -= lim
            del left[t]
    return share
