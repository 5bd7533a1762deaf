"""systemd's notify protocol (sd_notify(3)), by hand: one datagram to $NOTIFY_SOCKET.

READY=1 once the broker serves, STATUS= lines as things change, WATCHDOG=1 pings at half
the WatchdogSec systemd asked for ($WATCHDOG_USEC, for this process: $WATCHDOG_PID).
Outside systemd (no NOTIFY_SOCKET) every call does nothing."""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):            # abstract namespace
            addr = "\0" + addr[1:]
        self._addr = addr or None
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self._next_ping = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> None:
        if self._addr is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError:
            pass  # systemd went away or never listened: nothing to tell

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def tick(self) -> None:
        """Call each loop pass: pings the watchdog when due."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval_s
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
