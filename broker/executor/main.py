"""The executor process's entry point (`python -m kubecash.broker.executor`).

Started by the broker (as root where the broker is root), it confines itself before it
serves anything (kubecash.broker.confine): it forks its compile helper, moves into a view
holding only its tenant's directory and its modules, becomes the tenant's uid, and puts
every thread under the whole-process seccomp filter before the first kernel thread starts.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import signal

from kubecash.client import protocol as P
from kubecash.client.limits import Limits

from .. import confine, sandbox
from .accounting import bound_memory
from .service import Executor

JAIL_BYTES = 256 << 20     # the executor's tmpfs root: the private copies of loaded modules


def _die_with_parent() -> None:
    """An executor must not outlive its broker (PR_SET_PDEATHSIG, Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _preload_cpu_runtime(cache_dir: str) -> None:
    """What a CPU executor needs from the host after it has left the host's view: the
    sandbox runtime (built with g++ into the shared cache) and the libraries every module
    links against (dlopen finds a loaded soname without opening anything)."""
    from .. import backend_cpu  # noqa: F401  (imported now: the jail has no Python files)
    sandbox._load_native(cache_dir)
    for lib in ("libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libdl.so.2"):
        try:
            ctypes.CDLL(lib, mode=os.RTLD_GLOBAL)
        except OSError:
            pass     # not on this system: a module that needs it fails to load, loudly


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
    ap.add_argument("--owner", default="", help="uid:gid this executor runs as (the broker is root)")
    ap.add_argument("--file-owner", default="", help="uid:gid given the files it makes in the tenant's shm/ "
                    "(a root executor left unconfined: a GPU's)")
    ap.add_argument("--jail", default="", help="an empty directory to mount this executor's view on "
                    "(the broker is root)")
    ap.add_argument("--max-message-bytes", type=int, default=P.MAX_MESSAGE_BYTES)
    ap.add_argument("--limits", default="{}", help="JSON: per-tenant bounds (kubecash.client.limits.Limits fields)")
    ap.add_argument("--no-sandbox", action="store_true",
                    help="CPU backend: run kernels unconfined (no seccomp filter)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KUBECASH_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s executor[{a.tenant}/%(process)d] %(levelname)s %(message)s")
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a crash must not write tenant data to disk
    device = json.loads(a.device_json)
    uid = gid = None
    if a.owner:
        uid, gid = (int(x) for x in a.owner.split(":"))
    cpu = device["kind"] == "cpu"
    helper = None
    runtime_dir, module_dir = a.runtime_dir, None
    if cpu:
        # Forked first, while this process has one thread: the helper makes its own view.
        from ..compile_helper import CompileHelper
        helper = CompileHelper(os.path.join(a.cache_dir, "tenants", a.tenant),
                               view_at=a.jail or None, uid=uid, gid=gid)
        _preload_cpu_runtime(a.cache_dir)
    if a.jail:
        view = confine.View(a.jail, size_bytes=JAIL_BYTES)
        # Opened in the new namespace (a bind takes mounts of its own namespace only).
        tenants = os.open(os.path.join(a.runtime_dir, "tenants"), confine.DIR_NOFOLLOW)
        tdir = confine.open_dir_nofollow(tenants, a.tenant)
        view.mkdir("/tenants", 0o711)
        view.bind(tdir, f"/tenants/{a.tenant}", readonly=False, exec_=False)
        view.mkdir("/modules", 0o700, owner=(uid, gid) if uid is not None else None)
        os.close(tdir)
        os.close(tenants)
        view.enter()          # no descriptor of a host directory stays open: no way back out
        runtime_dir, module_dir = "/", "/modules"
    if uid is not None:
        confine.drop_to(uid, gid)
    confine_process = None
    if cpu and not a.no_sandbox:
        confine_process = sandbox.confine_process
    ex = Executor(a.tenant, device, runtime_dir, a.control_fd,
                  a.lease_fd, a.memory_limit, a.threads, a.cache_dir, a.max_message_bytes,
                  limits=Limits.from_dict(json.loads(a.limits)),
                  sandbox=not a.no_sandbox, compile_helper=helper, module_dir=module_dir,
                  before_backend=confine_process)
    bound_memory(device["kind"], a.memory_limit, lock=uid is not None)
    if uid is not None:
        ex.owner = (uid, gid)
    elif a.file_owner:
        ex.owner = tuple(int(x) for x in a.file_owner.split(":"))   # type: ignore[assignment]
    ex._capture_output()
    signal.signal(signal.SIGTERM, lambda *_: setattr(ex, "_stopping", True))
    try:
        ex.serve()
    finally:
        if helper is not None:
            helper.close()
    return 0
