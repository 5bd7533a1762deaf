"""The wire under a session: the process's ZeroMQ context and a channel (one DEALER socket
with the bookkeeping that matches replies to request ids)."""
from __future__ import annotations

import os

import msgpack
import zmq

from . import protocol as P
from .errors import CUresult, error_from_code

# A batch request's frame up to its session token: {"v", "id": 0, "op": "batch", "async",
# "session": <token>, "ops": [...]}. Id 0: nobody waits for it, and an id is one request's.
_packer = msgpack.Packer(use_bin_type=True)
_BATCH_HEAD = (_packer.pack_map_header(6) + b"".join(_packer.pack(x) for x in (
    "v", P.VERSION, "id", 0, "op", "batch", "async", True, "session")))
_OPS_KEY = _packer.pack("ops")

_contexts: dict[int, zmq.Context] = {}      # pid -> this library's context, never terminated


def _context() -> zmq.Context:
    """The one ZeroMQ context this library uses in this process. It is never terminated, and
    no session owns it: with a context per session, a session dropped unclosed was collected
    in one cycle with its sockets, the collector cleared the context's weak references to them
    before any finalizer ran, and Context.__del__ then waited in term() forever for sockets it
    could no longer close. Sockets are closed by their sessions, or else by their own
    finalizers (LINGER 0, so that never blocks). A forked child gets a new context; the
    parent's stays referenced, so it is never collected in the child either. (No lock, which
    a fork could inherit held: two threads racing here keep one context; the other has no
    sockets, so its collection returns at once.)"""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        ctx = _contexts.setdefault(pid, zmq.Context())
    return ctx


class _Channel:
    """One DEALER socket and the bookkeeping to match replies to request ids."""

    def __init__(self, ctx: zmq.Context, address: str, protocol: P.Channel = P.TENANT):
        self.protocol = protocol             # which declarations its requests and replies follow
        self.ops: dict[int, str] = {}        # request id -> op, to check its reply
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.stash: dict[int, dict] = {}
        self.abandoned: set[int] = set()     # ids whose waiter gave up: their replies are dropped
        # What the far end accepts: ZeroMQ drops a larger frame (and the connection) with no
        # reply, so a request past it is refused here rather than left waiting forever.
        self.max_bytes = P.MAX_MESSAGE_BYTES
        self.poller: zmq.Poller | None = None   # the session's, for waits on this channel
        # The push buffer (executor channels, once attached): asynchronous requests wait here,
        # packed, and leave as one "batch" message (see flush).
        self.batch_session: bytes | None = None
        self._batch: list[bytes] = []
        self._batch_bytes = 0

    def close(self) -> None:
        self.poller = None
        self.sock.close()

    def send(self, rid: int, op: str, fields: dict, *, asynchronous: bool = False) -> bool:
        """Frame request `rid` and send it, refusing one larger than the far end accepts.
        An asynchronous one goes into the push buffer where there is one; True if that
        opened a new batch (whoever flushes after a delay wants to know)."""
        frame = P.request(op, rid, asynchronous=asynchronous, **fields)
        if len(frame) > self.max_bytes:
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_VALUE,
                                  f"{op} request of {len(frame)} bytes exceeds the broker's "
                                  f"max_message_bytes ({self.max_bytes})")
        if not asynchronous:
            self.flush()                  # what was posted before it runs before it
            self.sock.send(frame)
            self.ops[rid] = op
            return False
        if self.batch_session is None:
            self.sock.send(frame)
            return False
        if self._batch_bytes + len(frame) > min(P.BATCH_MAX_BYTES, self.max_bytes - 1024):
            self.flush()
        self._batch.append(frame)
        self._batch_bytes += len(frame)
        if len(self._batch) >= P.BATCH_MAX_OPS:
            self.flush()
            return False
        return len(self._batch) == 1

    def flush(self) -> None:
        """Send the push buffer: one op as itself, more as one batch (their packed maps spliced
        into its "ops" array: each is packed once)."""
        if not self._batch:
            return
        ops, self._batch, self._batch_bytes = self._batch, [], 0
        if len(ops) == 1:
            self.sock.send(ops[0])
            return
        self.sock.send(b"".join((_BATCH_HEAD, msgpack.packb(self.batch_session),
                                 _OPS_KEY, _packer.pack_array_header(len(ops)), *ops)))
