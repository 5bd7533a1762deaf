"""What the tenant holds: memory charged to its quota, resources released when a session ends,
the shared-memory files it maps, and the executor's own memory bound."""
from __future__ import annotations

import os
import resource
import secrets

from kubecash.client.errors import E

from .state import (
    HostAlloc,
    SessionState,
    _err,
    log,
)


class Accounting:
    # -- resources ----------------------------------------------------------------------
    def _release(self, s: SessionState) -> None:
        """Free everything a session holds (runs on the runner or at shutdown)."""
        for ptr, size in list(s.allocs.items()):
            self.backend.free(ptr, size)
            with self._lock:
                self.memory_used -= size
        s.allocs.clear()
        s.globals.clear()
        for ptr, h in list(s.host.items()):
            self._drop_host(ptr, h)
        s.host.clear()
        s.bases.clear()
        if s.staging:
            self.backend.unmap(*s.staging)
            s.staging = None
        if s.staging_path:       # a client that died before unlinking it leaves the name
            try:
                os.unlink(s.staging_path)
            except FileNotFoundError:
                pass
            s.staging_path = None
        for m in s.modules.values():
            self.backend.unload_module(m)
        s.modules.clear()
        s.functions.clear()

    def _drop_host(self, ptr: int, h: HostAlloc) -> None:
        self.backend.unmap(ptr, h.size)
        try:
            os.unlink(h.path)
        except FileNotFoundError:
            pass
        if self.backend.kind == "cpu":       # on a CPU device host memory is device memory
            with self._lock:
                self.memory_used -= h.size

    def _charge(self, size: int, what: str) -> None:
        with self._lock:
            if self.memory_used + size > self.memory_limit:
                raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                           f"{what} of {size} bytes exceeds tenant '{self.tenant}' memory quota "
                           f"on {self.dev_name}: limit {self.memory_limit} bytes, "
                           f"{self.memory_used} in use")
            self.memory_used += size

    def _uncharge(self, size: int) -> None:
        with self._lock:
            self.memory_used -= size

    def _shm_file(self, kind: str, size: int) -> tuple[str, int]:
        name = f"{self.dev_name}-{secrets.token_hex(8)}.{kind}"
        path = os.path.join(self.shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if self.owner is not None:     # the tenant's containers map it as their uid
                os.fchown(fd, *self.owner)
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return path, fd


EXECUTOR_OVERHEAD_BYTES = 1 << 30   # interpreter, libraries, worker stacks, requests in flight


def bound_memory(kind: str, memory_limit: int) -> None:
    """An executor serves one tenant, but the node's memory is everyone's. On the CPU backend,
    whose device memory is the executor's own private memory, cap the process at the tenant's
    quota plus overhead (RLIMIT_DATA, soft), so nothing the tenant sends (a multi-frame message
    libzmq buffers whole, say) can make it take more: past it an allocation fails and at worst
    the executor dies, which only that tenant notices. Not on GPUs: the CUDA driver's own
    mappings are not sized by the quota (untested there)."""
    if kind != "cpu":
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = memory_limit + EXECUTOR_OVERHEAD_BYTES
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (OSError, ValueError) as e:
        log.warning("could not bound the executor's memory: %s", e)
