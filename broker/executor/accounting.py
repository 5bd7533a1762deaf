"""What the tenant holds: memory charged to its quota, resources released when a session ends,
the shared-memory files it maps, and the executor's own memory bound."""
from __future__ import annotations

import errno
import mmap
import os
import resource
import secrets

from kubecash.client.errors import E

from .. import confine
from .state import (
    HostAlloc,
    SessionState,
    _err,
    log,
)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG)


def tenant_dir_error(e: OSError, what: str):
    """Out of space is the asker's OUT_OF_MEMORY, saying so; anything else names the OS error."""
    if e.errno in _NO_SPACE:
        return _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                    f"{what}: {os.strerror(e.errno)} (the file system holding the tenant's directory is full)")
    return _err(E.CUDA_ERROR_OPERATING_SYSTEM, f"{what}: {os.strerror(e.errno)}")


def module_footprint(module) -> int:
    """What a loaded module takes from the quota (its code, data and __device__ globals on
    the CPU backend; a GPU module's memory is the driver's to count, not known here)."""
    return getattr(module, "footprint", 0)


class Accounting:
    # -- resources ----------------------------------------------------------------------
    def _release(self, s: SessionState) -> None:
        """Free everything a session holds (runs on the runner or at shutdown)."""
        for ptr, size in list(s.allocs.items()):
            self.backend.free(ptr, size)
            self._uncharge(self._granular(size))
        s.allocs.clear()
        if s.vmm or s.vmm_phys:
            self._release_vmm(s)
        s.globals.clear()
        for ptr, h in list(s.host.items()):
            self._drop_host(ptr, h)
        s.host.clear()
        s.bases.clear()
        if s.staging:
            self.backend.unmap(*s.staging)
            s.staging = None
            self._uncharge(s.staging_charged)
            s.staging_charged = 0
        if s.staging_path:       # a client that died before unlinking it leaves the name
            self._shm_unlink(s.staging_path)
            s.staging_path = None
        for m in s.modules.values():
            self.backend.unload_module(m)
            self._uncharge(module_footprint(m))
        s.modules.clear()
        s.functions.clear()

    def _drop_host(self, ptr: int, h: HostAlloc) -> None:
        self.backend.unmap(ptr, h.size)
        self._shm_unlink(h.path)
        if self.backend.kind == "cpu":       # on a CPU device host memory is device memory
            self._uncharge(self._granular(h.size))

    def _granular(self, size: int) -> int:
        """What an allocation of `size` bytes takes from the quota: whole pages on the CPU
        backend (each is a mapping of its own), 256-byte units on a GPU (cuMemAlloc's
        alignment), so a million tiny allocations cost what they hold."""
        unit = mmap.PAGESIZE if self.backend.kind == "cpu" else 256
        return -(-max(size, 1) // unit) * unit

    def _charge(self, size: int, what: str, asked: int | None = None) -> None:
        """Count `size` bytes against the quota, or OUT_OF_MEMORY naming `what` (`asked`: the
        size the tenant asked for, where the charge is rounded up from it)."""
        with self._lock:
            if self.memory_used + size > self.memory_limit:
                shown = f"{size} bytes" if asked in (None, size) else f"{asked} bytes (charged as {size})"
                raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                           f"{what} of {shown} exceeds tenant '{self.tenant}' memory quota "
                           f"on {self.dev_name}: limit {self.memory_limit} bytes, "
                           f"{self.memory_used} in use")
            self.memory_used += size

    def _uncharge(self, size: int) -> None:
        with self._lock:
            self.memory_used -= size

    def _shm_dir_fd(self) -> int:
        """The tenant's shm/ directory, opened anew and never through a symlink. The tenant owns
        its directory and may put a symlink where shm/ was at any time after this executor
        started; a GPU executor is root in the host's view, so a path through shm/ made its
        (backed) files, or removed them, wherever the tenant pointed (#17). The tenant's
        directory itself is in one the tenant cannot change (root's, or the view's)."""
        tdir = os.open(self.tenant_dir, confine.DIR_NOFOLLOW)
        try:
            return confine.open_dir_nofollow(tdir, "shm")
        finally:
            os.close(tdir)

    def _shm_unlink(self, path: str) -> None:
        """Remove a file _shm_file made (by its name, in the shm/ directory as it is now)."""
        try:
            d = self._shm_dir_fd()
        except OSError:
            return              # gone or replaced by the tenant: nothing of ours to remove there
        try:
            os.unlink(os.path.basename(path), dir_fd=d)
        except OSError:
            pass                # gone already; what is left the broker clears by its prefix
        finally:
            os.close(d)

    def _shm_file(self, kind: str, size: int, *, backed: bool = True) -> tuple[str, int]:
        # <device>-<pid>-: the broker removes what this executor leaves, and nothing else.
        name = f"{self.dev_name}-{os.getpid()}-{secrets.token_hex(8)}.{kind}"
        path = os.path.join(self.shm_dir, name)
        try:
            d = self._shm_dir_fd()
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=d)
            finally:
                os.close(d)
        except OSError as e:
            raise tenant_dir_error(e, f"cannot create the {kind} memory file in the tenant's shm directory") from None
        try:
            if self.owner is not None:     # the tenant's containers map it as their uid
                os.fchown(fd, *self.owner)
            # Backed now, all of it: a full file system is this request's OUT_OF_MEMORY,
            # never a SIGBUS later in whoever touches a page that had no room.
            if backed:                     # (an arena is backed per allocation instead)
                os.posix_fallocate(fd, 0, max(size, 1))
        except OSError as e:
            os.close(fd)
            self._shm_unlink(path)
            raise tenant_dir_error(e, f"cannot back {size} bytes of {kind} memory in the tenant's "
                                       "shm directory") from None
        return path, fd


EXECUTOR_OVERHEAD_BYTES = 1 << 30   # interpreter, libraries, worker stacks, requests in flight


def bound_memory(kind: str, memory_limit: int, *, pid: int = 0, lock: bool = False) -> None:
    """An executor serves one tenant, but the node's memory is everyone's. On the CPU backend,
    whose device memory is the executor's own private memory, cap the process (`pid`; 0:
    this one) at the tenant's quota plus overhead (RLIMIT_DATA), so nothing the tenant sends
    (a multi-frame message libzmq buffers whole, say) can make it take more: past it an
    allocation fails and at worst the executor dies, which only that tenant notices. With
    `lock` the hard limit goes down too, so code running in the executor cannot raise it
    again; only root can (the broker does, for a larger quota). Not on GPUs: the CUDA
    driver's own mappings are not sized by the quota (untested there)."""
    if kind != "cpu":
        return
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
        bound = memory_limit + EXECUTOR_OVERHEAD_BYTES
        if lock:
            resource.prlimit(pid, resource.RLIMIT_DATA, (bound, bound))
        else:
            resource.prlimit(pid, resource.RLIMIT_DATA,
                             (bound if hard == resource.RLIM_INFINITY else min(bound, hard), hard))
    except (OSError, ValueError) as e:
        log.warning("could not bound the executor's memory: %s", e)
