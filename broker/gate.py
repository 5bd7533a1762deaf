"""The broker's tenant-facing socket: ZMTP 3 spoken by hand over a ZeroMQ STREAM socket.

Clients are unchanged ZeroMQ DEALERs; on the wire this is the ROUTER the design names. The
broker does not use a ROUTER here because libzmq gives an untrusted peer three ways to make
the shared broker hold memory without bound: a multi-frame message is buffered whole (its
high-water mark counts finished messages, and MAXMSGSIZE is per frame), every connection gets
its own queue, and nothing caps the number of connections. A STREAM socket hands over raw
bytes as they arrive, so this module can enforce, per tenant:

- one frame per message, at most `max_bytes` (a larger frame or a multi-frame message is
  discarded as it streams in, never buffered, and the sender gets an error naming the limit);
- at most `max_connections` connections (more are closed at once);
- at most `rate` requests per second, burst `rate` (every 16 KiB received counts as one):
  past it the broker stops reading the
  tenant's socket, libzmq's small receive queue (RCVHWM chunks per connection) fills and the
  kernel pushes back on the senders, like a full pipe. Nothing is dropped; nobody else waits.

It also tells the broker when a connection closes, so a dead client's session ends at once
instead of at the heartbeat timeout.

ZMTP 3.1 (rfc.zeromq.org/spec/23, /37): a 64-byte greeting, the NULL mechanism's READY
command carrying Socket-Type, then frames: a flags octet (MORE 1, LONG 2, COMMAND 4) and a
1- or 8-octet size.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import struct
import time

import zmq

log = logging.getLogger("kubecash.broker")

GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f"      # signature
            + b"\x03\x01"                        # version 3.1
            + b"NULL".ljust(20, b"\x00")         # mechanism
            + b"\x01"                            # as-server
            + b"\x00" * 31)                      # filler
GREETING_LEN = 64
MORE, LONG, COMMAND = 1, 2, 4
COMMAND_MAX = 512                      # READY with its properties, PING: far smaller
PEER_TYPES = {b"DEALER"}   # a REQ would send an envelope frame: one frame per message here
RCVHWM_CHUNKS = 2                      # libzmq's raw chunks are <= 8 KiB: 16 KiB per connection
BYTES_PER_TOKEN = 16384               # bytes received cost budget too: a flood of junk is paced
MESSAGES_PER_PASS = 64                 # requests handled per tenant per pass of the broker's loop
OVER_LIMIT_CONNS = 16                  # connections past the limit kept to be told why
LOG_EVERY_S = 10.0                     # refusals are logged at most this often per tenant


def _command(name: bytes, body: bytes = b"") -> bytes:
    return _frame(bytes([len(name)]) + name + body, COMMAND)


def _frame(payload: bytes, flags: int = 0) -> bytes:
    if len(payload) < 256:
        return bytes([flags, len(payload)]) + payload
    return bytes([flags | LONG]) + struct.pack(">Q", len(payload)) + payload


READY = _command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER")


class Phase(enum.Enum):
    GREETING = 1      # waiting for the peer's 64-byte greeting
    READY = 2         # waiting for its READY command
    OPEN = 3          # exchanging messages


@dataclasses.dataclass
class _Conn:
    phase: Phase = Phase.GREETING
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    skip: int = 0                 # body bytes still to discard (an oversized frame)
    skipping_more: bool = False   # inside a multi-frame message: discard to its last frame
    refusal: str | None = None    # what to tell the peer once the discarded message ends
    over_limit: bool = False      # past max_connections: every request is answered with why
    opened: float = dataclasses.field(default_factory=time.monotonic)
    last_rx: float = dataclasses.field(default_factory=time.monotonic)   # last bytes from the peer
    pinged: float | None = None   # when a liveness PING went out unanswered so far


class GateEvent(enum.Enum):
    MESSAGE = 1       # (conn, payload): one complete single-frame message
    OVER_LIMIT = 4    # (conn, payload): a request on a connection past max_connections
    REFUSED = 2       # (conn, reason): a message was discarded; answer with an error
    CLOSED = 3        # (conn, None): the connection is gone


class Gate:
    """One tenant's socket. `receive()` returns what arrived; `send()` answers a connection."""

    def __init__(self, ctx: zmq.Context, address: str, *, tenant: str, max_bytes: int,
                 max_connections: int, rate: float):
        self.tenant = tenant
        self.max_bytes = max_bytes
        self.max_connections = max_connections
        self.rate = rate
        self.tokens = rate                      # a full burst to start with
        self._refilled = time.monotonic()
        self._paused_at: float | None = None    # when the current pause began
        self._paused_total = 0.0                # seconds paused before it
        self.last_notice = 0.0                  # when clients were last told of throttling
        self.sock = ctx.socket(zmq.STREAM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, RCVHWM_CHUNKS)
        try:
            self.sock.bind(address)
        except zmq.ZMQError:
            self.sock.close()       # an unclosed socket would hold the context's term() forever
            raise
        self.conns: dict[bytes, _Conn] = {}
        self._pending: dict[bytes, None] = {}   # connections with requests left unparsed
        self._left = MESSAGES_PER_PASS
        self.refused_connections = 0
        self.refused_messages = 0
        # Called after each send: a send consumes libzmq's readiness signal for what has
        # arrived meanwhile, so the broker must look at the socket again (readiness.py).
        self.on_send = None
        self._last_log = 0.0

    # -- the request budget -----------------------------------------------------------------
    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._paused_at is not None and not self.paused:
            self._paused_total += now - self._paused_at
            self._paused_at = None

    def throttled_s(self, now: float) -> float:
        """Seconds this socket has gone unread for being over budget, in all. The broker
        does not count them as a session's silence: it chose not to listen."""
        return self._paused_total + (now - self._paused_at if self._paused_at is not None else 0.0)

    @property
    def paused(self) -> bool:
        """Out of budget: the broker leaves the socket unread until refill() brings it back."""
        return self.tokens < 1.0

    def seconds_to_resume(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)

    # -- receiving ----------------------------------------------------------------------------
    @property
    def has_pending(self) -> bool:
        """Requests already received but left for a later pass (see receive())."""
        return bool(self._pending)

    def receive(self, max_chunks: int) -> list[tuple[GateEvent, bytes, object]]:
        """Read up to `max_chunks` raw chunks; return the events they complete, at most
        MESSAGES_PER_PASS of them. One 8 KiB chunk can hold 4096 tiny requests: handled in
        one go they would hold up every other tenant's work in the broker's loop for tens of
        milliseconds, so what is past the cap stays buffered (`has_pending`) and no new chunk
        is read until it is handled."""
        out: list[tuple[GateEvent, bytes, object]] = []
        self._left = MESSAGES_PER_PASS
        for ident in list(self._pending):
            if self._left <= 0 or self.paused:
                break
            del self._pending[ident]
            c = self.conns.get(ident)
            if c is not None and not self._parse(ident, c, out):
                self._close(ident)
                out.append((GateEvent.CLOSED, ident, None))
        for _ in range(max_chunks):
            if self.paused or self._pending or self._left <= 0:
                break
            try:
                ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:        # not [id, data]: cannot happen on a STREAM socket
                continue
            c = self.conns.get(ident)
            if not data:
                if c is None:
                    self._accept(ident)
                else:                         # the peer went away
                    del self.conns[ident]
                    out.append((GateEvent.CLOSED, ident, None))
                continue
            if c is None:                     # bytes from one we already closed
                continue
            self.tokens -= len(data) / BYTES_PER_TOKEN
            c.last_rx = time.monotonic()
            c.pinged = None
            c.buf += data
            if not self._parse(ident, c, out):
                self._close(ident)
                out.append((GateEvent.CLOSED, ident, None))
        if self.paused and self._paused_at is None:
            self._paused_at = time.monotonic()
        return out

    def sweep(self, now: float, timeout: float, in_use: set[bytes]) -> list[bytes]:
        """Close connections whose peer is gone without libzmq saying so, and return them.

        A STREAM socket gives no disconnect notification for a peer that connects, sends and
        closes before the broker first reads it (libzmq 4.3): its slot would stay taken for
        good. So a connection must finish its handshake within `timeout`; and one that carries
        no live session (`in_use`: those are watched by their heartbeats) and is silent for
        `timeout` is sent a ZMTP PING, which any live ZeroMQ peer answers with PONG; no answer
        within `timeout` more and it is closed. O(connections); run at housekeeping."""
        gone = []
        for ident, c in list(self.conns.items()):
            if c.phase is not Phase.OPEN:
                dead = now - c.opened > timeout
            elif ident in in_use:
                dead, c.pinged = False, None
            elif c.pinged is not None:
                dead = now - c.pinged > timeout
            else:
                dead = False
                if now - c.last_rx > timeout:
                    c.pinged = now
                    ttl = max(1, min(0xFFFF, int(timeout * 20)))     # deciseconds, two timeouts
                    self._raw(ident, _command(b"PING", struct.pack(">H", ttl)))
            if dead:
                self._close(ident)
                gone.append(ident)
        return gone

    def _accept(self, ident: bytes) -> None:
        over = sum(c.over_limit for c in self.conns.values()) if len(self.conns) >= self.max_connections else 0
        if len(self.conns) - over >= self.max_connections:
            self.refused_connections += 1
            self._say(f"tenant {self.tenant}: connection refused: {len(self.conns) - over} open, "
                      f"the limit is {self.max_connections} (max_connections_per_tenant)")
            if over >= OVER_LIMIT_CONNS:      # past even those told why: just close it
                self._raw(ident, b"")         # a zero-length send closes a STREAM connection
                return
            # A few more are kept, to answer their requests with the limit (a client told
            # why beats one left to time out); the client then closes them itself.
            self.conns[ident] = _Conn(over_limit=True)
        else:
            self.conns[ident] = _Conn()
        self._raw(ident, GREETING)

    @property
    def connections(self) -> int:
        """Open connections within the limit (those only told why are not counted)."""
        return sum(not c.over_limit for c in self.conns.values())

    def over_limit_reason(self) -> str:
        return (f"tenant '{self.tenant}' has {self.connections} connections open to the broker, "
                f"its max_connections_per_tenant is {self.max_connections} (a session holds two)")

    def _parse(self, ident: bytes, c: _Conn, out: list) -> bool:
        """Consume what `c.buf` holds. False: the peer broke ZMTP; drop the connection."""
        buf = c.buf
        if c.phase is Phase.GREETING:
            if len(buf) < GREETING_LEN:
                return buf[:1] in (b"", b"\xff")     # fail fast on a non-ZMTP peer
            g = bytes(buf[:GREETING_LEN])
            del buf[:GREETING_LEN]
            if g[0] != 0xFF or not g[9] & 1 or g[10] < 3 or g[12:32].rstrip(b"\x00") != b"NULL":
                return False
            c.phase = Phase.READY
            self._raw(ident, READY)
        pos = 0
        try:
            while True:
                if (self._left <= 0 or self.paused) and len(buf) > pos:
                    self._pending[ident] = None       # the rest waits for a later pass
                    break
                if c.skip:                    # discarding the body of a refused frame
                    n = min(c.skip, len(buf) - pos)
                    c.skip -= n
                    pos += n
                    if c.skip:
                        break
                    if not c.skipping_more:
                        self._refuse(ident, c, out)
                    continue
                if len(buf) - pos < 2:
                    break
                flags = buf[pos]
                if flags & ~(MORE | LONG | COMMAND) or flags & COMMAND and flags & MORE:
                    return False
                if flags & LONG:
                    if len(buf) - pos < 9:
                        break
                    size = struct.unpack_from(">Q", buf, pos + 1)[0]
                    head = 9
                else:
                    size = buf[pos + 1]
                    head = 2
                pos += head
                more = bool(flags & MORE)
                if flags & COMMAND and (size > COMMAND_MAX or c.skipping_more):
                    return False              # no client sends such a command
                if c.skipping_more or more or size > self.max_bytes:
                    # Refused: discard as it streams in, answer once its last frame is gone.
                    if c.refusal is None:
                        c.refusal = (f"a message of {size} bytes exceeds this tenant socket's "
                                     f"limit of {self.max_bytes} bytes (max_message_bytes)"
                                     if size > self.max_bytes and not c.skipping_more and not more else
                                     "expected one frame per message; a multi-frame message "
                                     "was discarded")
                    c.skipping_more = more
                    c.skip = size
                    if size == 0 and not more:
                        self._refuse(ident, c, out)
                    continue
                if len(buf) - pos < size:
                    pos -= head
                    break
                body = bytes(buf[pos:pos + size])
                pos += size
                self._left -= 1
                if flags & COMMAND:
                    self.tokens -= 1
                    if not self._command(ident, c, body):
                        return False
                elif c.phase is not Phase.OPEN:
                    return False              # a message before READY
                else:
                    self.tokens -= 1
                    out.append((GateEvent.OVER_LIMIT if c.over_limit else GateEvent.MESSAGE, ident, body))
        finally:
            del buf[:pos]
        return True

    def _refuse(self, ident: bytes, c: _Conn, out: list) -> None:
        self.refused_messages += 1
        self.tokens -= 1
        self._left -= 1
        out.append((GateEvent.REFUSED, ident, c.refusal or "message refused"))
        c.refusal = None
        c.skipping_more = False

    def _command(self, ident: bytes, c: _Conn, body: bytes) -> bool:
        n = body[0] if body else 0
        name, data = body[1:1 + n], body[1 + n:]
        if name == b"READY" and c.phase is Phase.READY:
            props = _properties(data)
            if props is None or props.get(b"Socket-Type") not in PEER_TYPES:
                why = b"peer must be a DEALER"
                self._raw(ident, _command(b"ERROR", bytes([len(why)]) + why))
                return False
            c.phase = Phase.OPEN
            return True
        if name == b"PING" and c.phase is Phase.OPEN and len(data) >= 2:
            self._raw(ident, _command(b"PONG", data[2:18]))
            return True
        return c.phase is Phase.OPEN and name in (b"PONG", b"SUBSCRIBE", b"CANCEL")

    # -- sending ------------------------------------------------------------------------------
    def send(self, ident: bytes, payload: bytes) -> None:
        c = self.conns.get(ident)
        if c is not None and c.phase is Phase.OPEN:
            self._raw(ident, _frame(payload))

    def broadcast(self, payload: bytes) -> None:
        for ident, c in self.conns.items():
            if c.phase is Phase.OPEN and not c.over_limit:
                self._raw(ident, _frame(payload))

    def _raw(self, ident: bytes, data: bytes) -> None:
        try:
            self.sock.send_multipart([ident, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass    # peer gone or not reading (heartbeats will tell); one frame is all or nothing
        if self.on_send is not None:
            self.on_send(self)

    def _close(self, ident: bytes) -> None:
        self.conns.pop(ident, None)
        self._pending.pop(ident, None)
        self._raw(ident, b"")

    def _say(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("%s", message)

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close()


def _properties(data: bytes) -> dict[bytes, bytes] | None:
    props, i = {}, 0
    try:
        while i < len(data):
            n = data[i]
            name = data[i + 1:i + 1 + n]
            i += 1 + n
            (vlen,) = struct.unpack_from(">I", data, i)
            i += 4
            if i + vlen > len(data):
                return None
            props[name] = data[i:i + vlen]
            i += vlen
    except (IndexError, struct.error):
        return None
    return props
