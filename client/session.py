"""The pythonic client API, in the spirit of cuda.core.

    import kubecash.client as kc
    with kc.connect() as session:                     # KUBECASH_BROKER or an explicit address
        dev = session.device("cpu0")
        a = dev.allocate(n * 4); a.copy_from(np.arange(n, dtype=np.float32))
        mod = dev.load_module(source=SRC)
        k = mod.get_kernel("vadd")
        s = dev.create_stream()
        dev.launch(k, grid=(n // 256,), block=(256,), args=[a, b, c, np.int32(n)], stream=s)
        s.synchronize(); out = c.copy_to(np.empty(n, np.float32))

Objects are made only by their owner (a Device allocates, creates streams and loads
modules), every resource has an idempotent close() and is a context manager.

This module holds Session (the connection to the broker on behalf of this process) and
connect(); the other objects live in device, memory, module and stream, the wire in transport.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from typing import Any

import zmq

from . import protocol as P
from .device import Device
from .errors import BrokerUnavailable, CudaError, CUresult, KubecashError, ProtocolError, error_from_code
from .resource import _Resource
from .transport import _Channel, _context

ENV_BROKER = "KUBECASH_BROKER"
HELLO_TIMEOUT_S = 10.0
DEAD_EXECUTOR_GRACE_S = 0.5   # see Session._drain_dead


def connect(address: str | None = None, *, timeout: float = HELLO_TIMEOUT_S) -> Session:
    """Open a session with the broker at `address` (default: $KUBECASH_BROKER)."""
    address = address or os.environ.get(ENV_BROKER)
    if not address:
        raise KubecashError(f"no broker address: pass one or set {ENV_BROKER}")
    return Session(address, timeout=timeout)


class Session(_Resource):
    """A connection to the broker on behalf of this process (one tenant)."""

    def __init__(self, address: str, *, timeout: float = HELLO_TIMEOUT_S):
        self.address = address
        self.tenant_dir = (os.path.dirname(address[len("ipc://"):])
                           if address.startswith("ipc://") else None)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._ctx = _context()
        self._broker = _Channel(self._ctx, address)
        self._broken: KubecashError | None = None
        self._failed: dict[str, CudaError] = {}     # device -> sticky error
        self._throttled_until = 0.0                 # monotonic time a "throttled" event named
        self._devices: dict[str, Device] = {}
        self._flusher: threading.Thread | None = None     # see _batch_opened
        self._flush_wanted = threading.Event()
        self._hb_stop = threading.Event()
        try:
            hello = self._call(self._broker, "hello", timeout=timeout, pid=os.getpid(),
                               client="kubecash.client")
        except BaseException:
            self._broker.close()
            self._closed = True
            raise
        self.token: bytes = hello["session"]
        self.tenant: str = hello["tenant"]
        self._device_info = {d["name"]: d for d in hello["devices"]}
        self._hb = threading.Thread(target=self._heartbeat,
                                    args=(hello["heartbeat_interval"], hello["heartbeat_timeout"]),
                                    name="kubecash-heartbeat", daemon=True)
        self._hb.start()

    # -- public -----------------------------------------------------------------------------
    @property
    def devices(self) -> list[Device]:
        return [self.device(name) for name in self._device_info]

    def device(self, name: str | int = 0) -> Device:
        if isinstance(name, int):
            names = list(self._device_info)
            if not 0 <= name < len(names):
                raise error_from_code(CUresult.CUDA_ERROR_INVALID_DEVICE,
                                      f"device index {name} out of range (have {len(names)})")
            name = names[name]
        with self._lock:
            self._check_open()
            if name not in self._device_info:
                raise error_from_code(CUresult.CUDA_ERROR_INVALID_DEVICE,
                                      f"no device '{name}' for tenant '{self.tenant}' "
                                      f"(have: {', '.join(self._device_info)})")
            if name not in self._devices:
                self._devices[name] = Device(self, self._device_info[name])
            return self._devices[name]

    def status(self) -> dict:
        """The broker's view of this tenant: sessions, memory and device time per device."""
        return self._call(self._broker, "status", session=self.token)

    # -- plumbing --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise KubecashError("session is closed")
        if self._broken is not None:
            raise self._broken

    def _send(self, ch: _Channel, op: str, fields: dict, *, asynchronous: bool = False) -> int:
        # Ids are per session, across its channels: one counter for the broker and every device.
        rid = next(self._ids)
        if not asynchronous:
            self._flush_devices()         # a synchronizing call: what was posted goes first
        if ch.send(rid, op, fields, asynchronous=asynchronous):
            self._batch_opened()
        return rid

    def _flush_devices(self) -> None:
        for d in self._devices.values():
            if d._ch is not None:
                d._ch.flush()

    def _batch_opened(self) -> None:
        """A push buffer has work that no call may flush soon: the flusher sends it after
        BATCH_DELAY_S, so a program that posts work and then does something else still has
        it run, as a GPU runs what was queued."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_later, name="kubecash-flush",
                                             daemon=True)
            self._flusher.start()
        self._flush_wanted.set()

    def _flush_later(self) -> None:
        while True:
            self._flush_wanted.wait()        # no timer while nothing is posted
            if self._hb_stop.is_set():
                return
            time.sleep(P.BATCH_DELAY_S)
            self._flush_wanted.clear()       # a batch opened after this is flushed next round
            with self._lock:
                if self._closed:
                    return
                try:
                    self._flush_devices()
                except zmq.ZMQError:
                    return                   # the session is closing under us

    def _wait(self, ch: _Channel, rid: int, *, timeout: float | None = None,
              watch: str | None = None) -> dict:
        """Wait for the reply to `rid` on `ch`, watching the broker for executor failures."""
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = False
        poller = ch.poller
        if poller is None:          # made once per channel: a sync call is one poll and one recv
            poller = ch.poller = zmq.Poller()
            poller.register(ch.sock, zmq.POLLIN)
            if ch is not self._broker:
                poller.register(self._broker.sock, zmq.POLLIN)
        while True:
            msg = ch.stash.pop(rid, None)
            if msg is not None:
                op = ch.ops.pop(rid, None)
                P.raise_for_reply(msg)
                return msg if op is None else P.check_reply(ch.protocol, op, msg)
            if watch is not None and watch in self._failed:   # that device's executor died
                if not drained:      # what it sent before it died (printf, this reply) first
                    drained = True
                    self._drain_dead(ch, rid)
                    continue
                raise self._failed[watch]
            if self._broken is not None:
                raise self._broken
            wait_ms = 100
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    ch.abandoned.add(rid)
                    ch.ops.pop(rid, None)
                    raise BrokerUnavailable(f"no answer from {self.address} within {timeout:g} s")
                wait_ms = min(wait_ms, max(1, int(left * 1000)))
            for sock, _ in poller.poll(wait_ms):
                # Everything queued, without the exception a last non-blocking recv raises.
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._dispatch(ch if sock is ch.sock else self._broker, sock.recv(zmq.NOBLOCK))

    def _drain_dead(self, ch: _Channel, rid: int, grace: float = DEAD_EXECUTOR_GRACE_S) -> None:
        """The broker said the executor behind `ch` died: its last frames (the kernel's
        printf, maybe the reply to `rid`) can still be on their way, behind the broker's
        event. Read them for a short while, until `rid` is answered or the socket is quiet."""
        deadline = time.monotonic() + grace
        while rid not in ch.stash:
            left = deadline - time.monotonic()
            if left <= 0 or not ch.sock.poll(max(1, int(left * 1000))):
                return
            while ch.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._dispatch(ch, ch.sock.recv(zmq.NOBLOCK))

    def _dispatch(self, ch: _Channel, frame: bytes) -> None:
        try:
            msg = P.unpack(frame)
        except ProtocolError:
            return
        if self._on_event(msg):
            return
        if isinstance(msg.get("id"), int) and msg["id"]:
            if msg["id"] in ch.abandoned:
                ch.abandoned.discard(msg["id"])
            else:
                ch.stash[msg["id"]] = msg

    # -- events: one handler per declared event (kubecash.client.protocol, channel "event") ----
    def _on_event(self, msg: dict) -> bool:
        """Handle `msg` if it is a well-formed event; False if it is not one."""
        name = P.check_event(msg)
        if name is None:
            return False
        getattr(self, P.handler_name(P.message(P.EVENT, name)))(msg)
        return True

    def _on_event_stdout(self, msg: dict) -> None:
        # What this session's kernels printed (device printf), at the next call, like
        # CUDA delivering its printf buffer at synchronization.
        out = getattr(sys.stdout, "buffer", None)
        if out is not None:
            sys.stdout.flush()
            out.write(msg["data"])
            out.flush()
        else:
            sys.stdout.write(msg["data"].decode(errors="replace"))

    def _on_event_session_ended(self, msg: dict) -> None:       # e.g. the tenant was removed
        self._broken = error_from_code(msg["code"], msg["error"] or "session ended by the broker")

    def _on_event_executor_died(self, msg: dict) -> None:
        self._failed[msg["device"]] = error_from_code(msg["code"], msg["error"])

    def _on_event_throttled(self, msg: dict) -> None:
        # The broker is alive but leaves this tenant's requests unread for a while
        # (max_requests_per_tenant_s): the heartbeat thread waits on, the answer will come.
        self._throttled_until = time.monotonic() + min(float(msg["seconds"]), 60.0)

    def _call(self, ch: _Channel, op: str, *, timeout: float | None = None,
              watch: str | None = None, **fields: Any) -> dict:
        with self._lock:
            if op != "hello":
                self._check_open()
            return self._wait(ch, self._send(ch, op, fields), timeout=timeout, watch=watch)

    def _heartbeat(self, interval: float, timeout: float) -> None:
        ch = _Channel(self._ctx, self.address)
        try:
            last_ok = time.monotonic()
            while not self._hb_stop.wait(interval):
                ch.sock.send(P.request("heartbeat", 1, session=self.token))
                deadline = time.monotonic() + timeout
                # Short polls, so close() never waits long for this thread.
                while not self._hb_stop.is_set() and time.monotonic() < deadline:
                    if not ch.sock.poll(100):
                        continue
                    try:
                        msg = P.unpack(ch.sock.recv())
                    except ProtocolError:
                        continue
                    if self._on_event(msg):
                        if msg["event"] == "throttled":
                            last_ok = max(last_ok, self._throttled_until)
                            deadline = max(deadline, last_ok + timeout)
                        continue
                    if msg.get("ok"):
                        last_ok = time.monotonic()
                    elif not self._closed:
                        self._broken = error_from_code(msg.get("code", 201),
                                                       f"session ended by the broker: {msg.get('error')}")
                        return
                    break
                if time.monotonic() - last_ok > timeout and not self._closed:
                    self._broken = BrokerUnavailable(
                        f"the broker at {self.address} stopped answering heartbeats")
                    return
        except zmq.ZMQError:
            return                           # the session is closing under us
        finally:
            ch.close()

    def _release(self) -> None:
        self._hb_stop.set()
        self._flush_wanted.set()              # the flusher sleeps until work or this
        with self._lock:
            for d in list(self._devices.values()):
                d._disconnect()
            if self._broken is None:
                try:
                    self._wait(self._broker, self._send(self._broker, "close",
                                                        {"session": self.token}), timeout=5)
                except KubecashError:
                    pass
            self._broker.close()
        self._hb.join(timeout=5)
        if self._flusher is not None:
            self._flusher.join(timeout=5)
