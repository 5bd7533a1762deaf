"""Every bound KubeCASH puts on what a tenant can make it hold, with its default: one place.

`Limits` is what the quota file's [broker] section sets per tenant and session (the broker
hands the executors the same object); `LAUNCH` is CUDA's own bound on launch shapes, the
same on every device KubeCASH presents; the rest are wire-level sizes the protocol uses.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def _limit(default: int | float, doc: str, lo: int | float, hi: int | float) -> Any:
    """A bound: its default, what it means, and the values a quota file may give it."""
    return dataclasses.field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi})


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-tenant bounds (each at least 1). Each error that enforces one names it."""
    max_message_bytes: int = _limit(64 << 20, "largest request frame (broker sockets: at most 16 KiB)", 1024, 1 << 31)
    max_sessions_per_tenant: int = _limit(256, "open sessions per tenant (a hello past it is refused)", 1, 1 << 20)
    max_handles_per_session: int = _limit(
        65536, "allocations + streams + events + modules + functions, per session", 1, 1 << 24)
    max_modules_per_session: int = _limit(256, "modules loaded or loading, per session and device", 1, 1 << 16)
    max_module_bytes: int = _limit(32 << 20, "module source or image size (fatbins of libraries such as CuPy's "
                                   "CUB are 9 MiB and more)", 1, 32 << 20)
    max_queued_ops_per_session: int = _limit(4096, "work an executor queues for one session", 1, 1 << 24)
    max_connections_per_tenant: int = _limit(
        600, "connections to a tenant's broker socket (a session holds 2)", 1, 1 << 20)
    max_requests_per_tenant_s: float = _limit(
        2000.0, "broker requests per second and tenant (past it: back-pressure)", 0.001, 1e9)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Limits))


@dataclasses.dataclass(frozen=True)
class LaunchLimits:
    """CUDA's bounds on a launch, reported as device attributes and checked at every launch."""
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_threads_per_block: int = 1024
    max_shared_bytes: int = 1 << 32          # wire bound; a device's own limit is lower
    max_kernel_params: int = 4096


LAUNCH = LaunchLimits()

# Wire-level sizes.
INLINE_MAX = 64 << 10               # copies up to this size travel inside the message
# The push buffer: asynchronous requests travel to the executor as one "batch" message of up
# to this many (flushed at the next synchronizing call, at these bounds, or after BATCH_DELAY_S).
BATCH_MAX_OPS = 256
BATCH_MAX_BYTES = 256 << 10
BATCH_DELAY_S = 0.0005
VMM_GRANULARITY = 2 << 20          # cuMemGetAllocationGranularity: what a GPU reports, and huge pages
DEFAULT_STAGING_BYTES = 32 << 20    # per-session shared-memory staging segment
BROKER_MESSAGE_MAX = 16 << 10       # broker requests (hello, open, heartbeat...) are far smaller
ADMIN_MESSAGE_MAX = 1 << 20         # brokerctl's requests
CONTROL_MESSAGE_MAX = 4096          # broker <-> executor socketpair packets (a few hundred bytes)
MODULE_SOURCE_MAX = 8 << 20         # what the protocol carries of a source at all, whatever max_module_bytes says
MODULE_IMAGE_MAX = 32 << 20
COMPILED_IMAGE_MAX = 64 << 20        # a built CPU module the compile helper hands its executor
