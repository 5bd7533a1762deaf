"""Executor: the data plane. One process per (tenant, device), started and reaped by the broker.

It owns the tenant's context on the device: allocations, modules, streams, events, the
shared-memory segments it shares with the tenant's clients. Clients talk to it directly on
`<tenant dir>/<device>.sock`; the broker talks to it on two socketpairs it inherits (control
messages, and device leases), which nothing else can reach.

Threads
- main: the only thread touching the client socket and session tables; validates each request,
  answers the immediate ones (alloc, module load bookkeeping, queries) and queues the rest.
- runner: executes queued work in per-session FIFO order, one operation at a time, round
  robin across sessions. Executing each session's requests in submission order is a valid
  schedule for every CUDA stream semantics (stream order, legacy default stream, events
  recorded before a wait), so streams only need to track what is pending on them.
- compiler: module builds (seconds of g++) run off the main thread.
Work done off the main thread comes back as callables on `self._calls`, with a pipe to wake
the main loop.

Modules: state (per-session tables), service (Executor: main loop, control, dispatch), runner
(queued work under the device lease), accounting (memory charged, resources released), output
(kernel printf), ops_memory / ops_copy / ops_module / ops_sync (the op_<name> handlers by
family), main (the process entry point).
"""
from .main import main
from .service import Executor
from .state import EventState, HostAlloc, QueuedOp, SessionState, StreamState

__all__ = ["main", "Executor", "SessionState", "StreamState", "EventState", "HostAlloc", "QueuedOp",
]
