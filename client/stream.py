"""Ordering work on a device: Stream (a queue of work) and Event (a point in one)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import KubecashError
from .resource import _Resource

if TYPE_CHECKING:
    from .device import Device


def _stream_handle(stream: Stream | None) -> int:
    return 0 if stream is None else stream.handle


class Stream(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def synchronize(self) -> None:
        self.device.request("stream_sync", stream=self.handle)

    def query(self) -> bool:
        """True when all work queued on the stream has completed."""
        return self.device.request("stream_query", stream=self.handle)["ready"]

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for `event`."""
        self.device.submit("stream_wait_event", stream=self.handle, event=event.handle)

    def record(self, event: Event | None = None) -> Event:
        event = event or self.device.create_event()
        event.record(self)
        return event

    def _release(self) -> None:
        if self.handle and self.device._ch is not None and not self.device.session._closed:
            try:
                self.device.request("stream_destroy", stream=self.handle)
            except KubecashError:
                pass


class Event(_Resource):
    def __init__(self, device: Device, handle: int):
        self.device, self.handle = device, handle

    def record(self, stream: Stream | None = None) -> None:
        self.device.submit("event_record", event=self.handle, stream=_stream_handle(stream))

    def synchronize(self) -> None:
        self.device.request("event_sync", event=self.handle)

    def query(self) -> bool:
        return self.device.request("event_query", event=self.handle)["ready"]

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded and complete)."""
        return self.device.request("event_elapsed", start=start.handle, end=self.handle)["ms"]

    def __sub__(self, start: Event) -> float:
        return self.elapsed_ms(start)

    def _release(self) -> None:
        if self.device._ch is not None and not self.device.session._closed:
            try:
                self.device.request("event_destroy", event=self.handle)
            except KubecashError:
                pass
