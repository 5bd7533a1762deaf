"""Operations on streams and events, and synchronization (answered when the work they wait
for has run)."""
from __future__ import annotations

import time

from kubecash.client import protocol as P
from kubecash.client.errors import E

from .state import (
    EventState,
    SessionState,
    StreamState,
    _err,
)


class SyncOps:
    def op_stream_create(self, s: SessionState, msg: dict, ident: bytes):
        self._check_handles(s, "a stream")
        h = self._new_handle()
        s.streams[h] = StreamState(h)
        return {"stream": h}

    def op_stream_destroy(self, s: SessionState, msg: dict, ident: bytes):
        if msg["stream"] == 0 or s.streams.pop(msg["stream"], None) is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"stream {msg['stream']:#x} is not one of this session's")
        return {}   # work already queued on it still runs (as in CUDA)

    def _sync_payload_locked(self, s: SessionState, rid: int) -> bytes:
        """The reply of a synchronizing request: an error kept from async work, or success."""
        if s.deferred is not None:
            e, s.deferred = s.deferred, None
            return P.error(rid, e.code, e.message, e.log)
        return P.reply(rid)

    def _wait_for(self, s: SessionState, obj: StreamState | EventState, ident: bytes, rid: int) -> None:
        """Answer when everything queued on `obj` so far has run (now, if it has)."""
        with self._cv:
            if obj.pending:
                limit = 2 * self.limits.max_queued_ops_per_session
                if len(obj.waiters) >= limit:    # synchronize requests nobody waits for
                    raise _err(E.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                               f"{len(obj.waiters)} synchronize requests already wait on this "
                               f"stream or event (2 x max_queued_ops_per_session)")
                obj.waiters.append((s, ident, rid))
                return
            payload = self._sync_payload_locked(s, rid)
        self._run_calls()                # see _sync_session
        self._send(ident, payload)

    def op_stream_sync(self, s: SessionState, msg: dict, ident: bytes):
        st = self._stream(s, msg)
        if st.handle == 0:
            # The legacy default stream orders against every blocking stream: wait for all
            # of this session's work queued so far.
            self._sync_session(s, msg, ident)
        else:
            self._wait_for(s, st, ident, msg["id"])

    def _sync_session(self, s: SessionState, msg: dict, ident: bytes) -> None:
        """Answer once all of the session's work queued so far has run: at once when none
        is queued or running, without a hand-off to the runner and back (#17)."""
        payload = None
        if not msg.get("async"):
            with self._cv:
                if not s.queue and not s.running:
                    payload = self._sync_payload_locked(s, msg["id"])
        if payload is None:
            self._queue_op(s, msg, ident, lambda: None)
        else:
            # What the work that just ran sent through the main thread (its printf, its
            # replies) is still queued here: it goes first, as it would behind a queued sync.
            self._run_calls()
            self._send(ident, payload)

    def op_stream_query(self, s: SessionState, msg: dict, ident: bytes):
        return {"ready": self._stream(s, msg).pending == 0}

    def op_stream_wait_event(self, s: SessionState, msg: dict, ident: bytes):
        # Work runs in submission order, so the event's last record is already ahead of
        # anything queued after this: validation is all there is to do.
        self._stream(s, msg)
        self._event(s, msg["event"])
        if not msg.get("async"):
            return {}

    def op_event_create(self, s: SessionState, msg: dict, ident: bytes):
        self._check_handles(s, "an event")
        h = self._new_handle()
        s.events[h] = EventState(h)
        return {"event": h}

    def op_event_destroy(self, s: SessionState, msg: dict, ident: bytes):
        if s.events.pop(msg["event"], None) is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, f"event {msg['event']:#x} is not one of this session's")
        return {}

    def op_event_record(self, s: SessionState, msg: dict, ident: bytes):
        ev = self._event(s, msg["event"])

        def record() -> None:
            ev.time_ns = time.perf_counter_ns()
        self._queue_op(s, msg, ident, record, stream=self._stream(s, msg), event=ev, sync_point=False)

    def op_event_sync(self, s: SessionState, msg: dict, ident: bytes):
        self._wait_for(s, self._event(s, msg["event"]), ident, msg["id"])

    def op_event_query(self, s: SessionState, msg: dict, ident: bytes):
        return {"ready": self._event(s, msg["event"]).pending == 0}

    def op_event_elapsed(self, s: SessionState, msg: dict, ident: bytes):
        a, b = self._event(s, msg["start"]), self._event(s, msg["end"])
        if a.pending or b.pending:
            raise _err(E.CUDA_ERROR_NOT_READY, "an event has not completed yet")
        if a.time_ns is None or b.time_ns is None:
            raise _err(E.CUDA_ERROR_INVALID_HANDLE, "an event was never recorded")
        return {"ms": (b.time_ns - a.time_ns) / 1e6}

    def op_ctx_sync(self, s: SessionState, msg: dict, ident: bytes):
        self._sync_session(s, msg, ident)
