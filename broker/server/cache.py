"""The compiled-kernel cache on disk: held to its size cap, and builds or loads left behind by
killed executors removed."""
from __future__ import annotations

import logging
import os
import shutil
import time

log = logging.getLogger("kubecash.broker")
CACHE_TRIM_INTERVAL_S = 30.0  # how often the compiled-kernel cache is held to its cap
STALE_BUILD_S = 600.0         # a build or load file this old was left by a killed executor


def trim_cache(d: str, max_bytes: int) -> None:
    """Hold the compiled-kernel cache `d` (every tenant's builds together) to `max_bytes`,
    so no tenant can fill the node's disk by loading ever new modules. Executors load
    private copies, so removing a cached build never disturbs one in use."""
    now = time.time()
    builds, total = [], 0
    entries = []
    # The shared runtime at the top; each tenant's builds in tenants/<name> (its helper's).
    for sub in [d, *sorted(os.path.join(d, "tenants", n) for n in _names(os.path.join(d, "tenants")))]:
        try:
            entries += list(os.scandir(sub))
        except OSError:
            continue
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if e.name.startswith((".build-", ".load-")):
                if now - st.st_mtime > STALE_BUILD_S:
                    shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
            elif e.name.endswith(".so"):
                builds.append((st.st_mtime, st.st_size, e.path))
                total += st.st_size
        except OSError:
            continue
    if total <= max_bytes:
        return
    builds.sort()
    target = max_bytes * 0.8
    for _, size, path in builds:
        if total <= target:
            break
        try:
            os.unlink(path)
            total -= size
        except OSError:
            pass
    log.info("compiled-kernel cache trimmed to %d bytes", total)


def _names(d: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
