"""Which tenants' sockets the broker's loop must read this pass, at a cost that grows with
the tenants that have traffic, not with those configured.

A zmq.Poller over every tenant's socket costs each pass a scan of all of them (libzmq builds
its pollfd array and asks each socket for its events), and so did refilling every tenant's
request budget: a broker with 1000 idle tenants spent 5-7 % of a core doing nothing. Here
the tenants' sockets sit in one epoll set, which the broker's poller watches as a single fd.

libzmq signals a socket's fd (ZMQ_FD) when commands reach it; what can be read is its
ZMQ_EVENTS, and asking for them consumes the signal. A send on the socket consumes it too,
and a socket left unread (a bounded batch, a paused tenant) gets no new signal for data that
is already queued. So each socket is asked for its events whenever it signals, after each
read and after each send (Gate.on_send), and is read while they say POLLIN: no readiness is
lost, and an idle tenant costs nothing. A tenant over its request rate leaves the epoll set
until its budget refills, at a time kept in a heap: no per-pass refill of every budget.
"""
from __future__ import annotations

import heapq
import itertools
import select
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    from .tenants import TenantState

MIN_PAUSE_S = 0.001     # a budget just short of one request: look again after this at least


class TenantSockets:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._fd_of: dict[TenantState, int] = {}
        self._by_fd: dict[int, TenantState] = {}
        self._paused: set[TenantState] = set()
        self._resume: list[tuple[float, int, TenantState]] = []   # heap: when a paused one is read again
        self._seq = itertools.count()
        self._due: dict[TenantState, None] = {}     # to read this pass (insertion order: fair)

    def fileno(self) -> int:
        return self._ep.fileno()

    def __len__(self) -> int:
        return len(self._fd_of)

    def add(self, t: TenantState) -> None:
        fd = t.gate.sock.getsockopt(zmq.FD)
        self._ep.register(fd, select.EPOLLIN)
        self._fd_of[t] = fd
        self._by_fd[fd] = t
        t.gate.on_send = lambda _gate, t=t: self.check(t)
        self.check(t)                   # whatever arrived before it was watched

    def remove(self, t: TenantState) -> None:
        fd = self._fd_of.pop(t, None)
        if fd is None:
            return
        del self._by_fd[fd]
        t.gate.on_send = None
        if t in self._paused:
            self._paused.discard(t)     # its heap entry is skipped when it comes up
        else:
            self._ep.unregister(fd)
        self._due.pop(t, None)

    def paused(self, t: TenantState) -> bool:
        return t in self._paused

    def pause(self, t: TenantState, now: float) -> None:
        """Over its request rate: unread until its budget refills (back-pressure)."""
        if t not in self._fd_of or t in self._paused:
            return
        self._ep.unregister(self._fd_of[t])
        self._paused.add(t)
        self._due.pop(t, None)
        heapq.heappush(self._resume, (now + max(MIN_PAUSE_S, t.gate.seconds_to_resume()), next(self._seq), t))

    def check(self, t: TenantState) -> None:
        """Read `t` this pass if its socket holds something (or its gate has parsed requests
        left over): after a read, a send, or a signal."""
        if t not in self._fd_of or t in self._paused or t.gate.sock.closed:
            return
        if t.gate.has_pending or t.gate.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._due[t] = None

    def timeout_s(self, now: float) -> float | None:
        """How long the loop may wait on its own: 0 while some tenant is due, else until the
        next paused tenant may be read, else no bound from here."""
        if self._due:
            return 0.0
        return max(0.0, self._resume[0][0] - now) if self._resume else None

    def collect(self, now: float) -> list[TenantState]:
        """The tenants to read this pass (each gets its budget refilled first)."""
        while self._resume and self._resume[0][0] <= now:
            _, _, t = heapq.heappop(self._resume)
            if t not in self._paused:
                continue                # removed meanwhile
            t.gate.refill(now)
            if t.gate.paused:
                heapq.heappush(self._resume, (now + max(MIN_PAUSE_S, t.gate.seconds_to_resume()),
                                              next(self._seq), t))
                continue
            self._paused.discard(t)
            self._ep.register(self._fd_of[t], select.EPOLLIN)
            self.check(t)
        for fd, _ in self._ep.poll(0):
            t = self._by_fd.get(fd)
            if t is not None:
                self.check(t)          # asking for its events also resets the signal
        out = list(self._due)
        self._due.clear()
        for t in out:
            t.gate.refill(now)
        return out

    def close(self) -> None:
        self._ep.close()
