"""What an executor keeps per session: its handles and tables, its queued work; shared
names of the executor package."""
from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from kubecash.client.errors import CudaError, error_from_code

log = logging.getLogger("kubecash.executor")


SUSPENDED = object()     # what a preempted kernel's op returns: run the rest later


TRIM_INTERVAL_S = 5.0    # malloc.trim() takes under a ms; freed memory goes back within 5 s



def _err(code: int, msg: str, log: str = "") -> CudaError:
    return error_from_code(code, msg, log=log)

@dataclasses.dataclass
class StreamState:
    handle: int
    pending: int = 0
    waiters: list = dataclasses.field(default_factory=list)   # (session, ident, request id)

@dataclasses.dataclass
class EventState:
    handle: int
    pending: int = 0
    time_ns: int | None = None
    waiters: list = dataclasses.field(default_factory=list)   # (session, ident, request id)

@dataclasses.dataclass
class HostAlloc:
    size: int
    path: str

@dataclasses.dataclass
class QueuedOp:
    fn: Callable[[], dict[str, Any] | None]
    ident: bytes | None          # reply to this peer, or None for an async op
    req_id: int
    stream: StreamState | None
    event: EventState | None = None
    sync_point: bool = False     # its reply carries errors kept from earlier async work
    kernel: bool = False
    device: bool = False         # uses the device: runs only under the broker's lease
    release: bool = False        # frees something: still runs if the session ends first

class SessionState:
    def __init__(self, token: bytes):
        self.token = token
        self.allocs: dict[int, int] = {}        # device pointer -> size
        self.bases: list[int] = []              # sorted keys of allocs + host, for range checks
        self.host: dict[int, HostAlloc] = {}    # mapped host memory, executor address -> alloc
        self.globals: dict[int, tuple[int, int]] = {}   # module variables: address -> (size, module)
        self.modules: dict[int, Any] = {}
        self.functions: dict[int, tuple[int, Any, tuple[int, ...]]] = {}
        self.streams: dict[int, StreamState] = {0: StreamState(0)}
        self.events: dict[int, EventState] = {}
        self.queue: collections.deque[QueuedOp] = collections.deque()
        self.deferred: CudaError | None = None  # first error of an async op, until a sync point
        self.staging: tuple[int, int] | None = None   # (executor address, size)
        self.staging_path: str | None = None    # its file; the client unlinks it once mapped
        self.staging_charged = 0                # what the staging segment counts in the quota
        self.closed = False
        self.in_ready = False                   # listed in the runner's round robin
        self.running = 0                        # its ops the runner is executing right now
        self.ident: bytes | None = None         # the client's socket, for kernel output
        self.building = 0                       # module loads submitted, not yet registered
        self.fn_names: dict[tuple[int, str], int] = {}   # (module, name) -> function handle
        self.vmm: dict[int, Any] = {}           # reserved ranges (ops_vmm.Reservation), in bases too
        self.vmm_phys: dict[int, Any] = {}      # physical allocations (ops_vmm.Physical) by handle

    def handle_count(self) -> int:
        """Everything the session holds a handle to (what max_handles_per_session bounds)."""
        return (len(self.allocs) + len(self.host) + len(self.streams) - 1 + len(self.events)
                + len(self.modules) + self.building + len(self.functions) + len(self.vmm)
                + len(self.vmm_phys) + sum(len(r.maps) for r in self.vmm.values()))
