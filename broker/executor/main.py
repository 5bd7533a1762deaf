"""The executor process's entry point (`python -m kubecash.broker.executor`)."""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import signal

from kubecash.client import protocol as P
from kubecash.client.limits import Limits

from .accounting import bound_memory
from .service import Executor


def _die_with_parent() -> None:
    """An executor must not outlive its broker (PR_SET_PDEATHSIG, Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubecash-executor")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--device-json", required=True)
    ap.add_argument("--runtime-dir", required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--lease-fd", type=int, required=True)
    ap.add_argument("--memory-limit", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--owner", default="", help="uid:gid of the tenant's containers")
    ap.add_argument("--max-message-bytes", type=int, default=P.MAX_MESSAGE_BYTES)
    ap.add_argument("--limits", default="{}", help="JSON: per-tenant bounds (kubecash.client.limits.Limits fields)")
    ap.add_argument("--no-sandbox", action="store_true",
                    help="CPU backend: run kernels unconfined (no seccomp filter)")
    a = ap.parse_args(argv)
    import json
    logging.basicConfig(level=os.environ.get("KUBECASH_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s executor[{a.tenant}/%(process)d] %(levelname)s %(message)s")
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a crash must not write tenant data to disk
    ex = Executor(a.tenant, json.loads(a.device_json), a.runtime_dir, a.control_fd,
                  a.lease_fd, a.memory_limit, a.threads, a.cache_dir, a.max_message_bytes,
                  limits=Limits.from_dict(json.loads(a.limits)),
                  sandbox=not a.no_sandbox)
    bound_memory(ex.device["kind"], a.memory_limit)
    if a.owner:
        uid, gid = a.owner.split(":")
        ex.owner = (int(uid), int(gid))
    ex._capture_output()
    signal.signal(signal.SIGTERM, lambda *_: setattr(ex, "_stopping", True))
    ex.serve()
    return 0
