"""The broker: the control plane of one node.

It serves each tenant on its own socket `<runtime_dir>/tenants/<tenant>/broker.sock` (a
session's tenant is the socket it came in on, never a name it claims), starts one executor
per (tenant, device) when a session first opens that device, ends it with the tenant's last
session, and purges sessions whose heartbeats stop. It never runs tenant code and never
holds tenant data: per-kernel traffic goes straight from clients to their executor.

Rooms (the Broker class is composed of one mixin from each of the first five):
  tenants.py    tenant sockets, client sessions and their requests
  executors.py  executor processes and their control socketpair
  leases.py     lease socketpair, device grants, limit buckets, max_kernel_seconds
  admin.py      the operator's socket: status, evict, drain, reload, set_quota
  dynamic.py    dynamic tenants: tenant_add, tenant_remove, tenant_list; the state file
  cache.py      the compiled-kernel cache's size cap
  core.py       Broker: state, start, serve loop, housekeeping, publish, close
"""
from __future__ import annotations

from .cache import CACHE_TRIM_INTERVAL_S, STALE_BUILD_S
from .core import STATUS_INTERVAL_S, Broker
from .executors import CONTROL_OUTBOX_MAX, EXECUTOR_STOP_TIMEOUT_S, ExecutorProc
from .tenants import GATE_BATCH, THROTTLE_NOTICE_S, ClientSession, PendingOpen, TenantState

__all__ = ["Broker", "ClientSession", "ExecutorProc", "PendingOpen", "TenantState",
           "CACHE_TRIM_INTERVAL_S", "CONTROL_OUTBOX_MAX",
           "EXECUTOR_STOP_TIMEOUT_S", "GATE_BATCH", "STATUS_INTERVAL_S", "STALE_BUILD_S", "THROTTLE_NOTICE_S"]
