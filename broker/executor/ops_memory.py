"""Operations on memory: attach (the staging segment), device and mapped host allocations."""
from __future__ import annotations

import bisect
import mmap
import os

from kubecash.client.errors import CudaError, E

from ..arena import Arena, arena_size
from .state import (
    HostAlloc,
    SessionState,
    _err,
    log,
)

STAGING_MIN = 1 << 20      # a smaller segment is not worth its round trips: copies go inline
STAGING_SHARE = 8          # at most this fraction of what is free in the quota (CPU devices)


class MemoryOps:
    def _staging_size(self) -> int:
        """The staging segment for a new session: the configured size, but on a CPU device (where
        it counts in the quota) no more than 1/STAGING_SHARE of what is free, and none at all
        when that is under STAGING_MIN (a tiny quota still gets a working context)."""
        if self.backend.kind != "cpu":
            return self.staging_bytes
        with self._lock:
            free = max(0, self.memory_limit - self.memory_used)
        size = min(self.staging_bytes, free // STAGING_SHARE) & ~(mmap.PAGESIZE * 16 - 1)
        return size if size >= STAGING_MIN else 0

    def _arena(self) -> Arena | None:
        """The CPU device's memory arena, made at the first attach (the tenant's uid is known
        by then); None on a GPU, or where it cannot be made (copies are then staged)."""
        if self.backend.kind != "cpu" or self._arena_tried:
            return getattr(self.backend, "arena", None)
        self._arena_tried = True
        size = arena_size(self.memory_limit)
        path = None
        try:
            path, fd = self._shm_file("arena", size, backed=False)
            try:
                os.ftruncate(fd, size)          # sparse: nothing is backed until allocated
                self.backend.arena = Arena(path, fd, size, unlink=self._shm_unlink)
            except OSError:
                os.close(fd)
                raise
        except (OSError, CudaError) as e:
            if path is not None:
                self._shm_unlink(path)
            log.warning("no memory arena for %s (copies go through staging): %s", self.dev_name,
                        getattr(e, "message", None) or e)
        return self.backend.arena

    # -- operations: each op_<name> handles the request of that name ----------------------
    def op_attach(self, s: SessionState, msg: dict, ident: bytes):
        path, size = "", 0
        if s.staging is None:
            size = self._staging_size()
        if size:
            # Host memory the tenant holds, like a mapped host allocation: on a CPU device it
            # is device memory, and counts.
            charged = size if self.backend.kind == "cpu" else 0
            self._charge(charged, "the session's staging segment")
            try:
                path, fd = self._shm_file("staging", size)
                try:
                    s.staging = (self.backend.map_file(fd, size), size)
                finally:
                    os.close(fd)
            except BaseException:
                self._uncharge(charged)
                if path:
                    self._shm_unlink(path)
                raise
            s.staging_path, s.staging_charged = path, charged
        arena = self._arena()
        return {"arena": os.path.basename(arena.path) if arena else "",
                "arena_size": arena.size if arena else 0, "arena_base": arena.base if arena else 0,
                "staging": os.path.basename(path), "staging_size": size,
                "memory_limit": self.memory_limit, "device": self.device,
                "max_queued_ops": self.limits.max_queued_ops_per_session,
                "max_message_bytes": self.max_message_bytes}

    def op_mem_alloc(self, s: SessionState, msg: dict, ident: bytes):
        size = msg["size"]
        if size == 0:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "cannot allocate 0 bytes")
        self._check_handles(s, "an allocation")
        charged = self._granular(size)
        self._charge(charged, "allocation", asked=size)
        try:
            ptr = self.backend.alloc(size)
        except CudaError:
            self._uncharge(charged)
            raise
        s.allocs[ptr] = size
        bisect.insort(s.bases, ptr)
        return {"ptr": ptr}

    def op_mem_free(self, s: SessionState, msg: dict, ident: bytes):
        ptr = msg["ptr"]
        self._check_queue(s, msg)          # before the tables change: a refusal changes nothing
        size = s.allocs.pop(ptr, None)
        if size is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{ptr:#x} is not the start of an allocation of this session")
        s.bases.remove(ptr)

        def free() -> None:               # after the work queued before it has run
            self.backend.free(ptr, size)
            self._uncharge(self._granular(size))
        self._queue_op(s, msg, ident, free, release=True)

    def op_mem_info(self, s: SessionState, msg: dict, ident: bytes):
        with self._lock:
            return {"free": max(0, self.memory_limit - self.memory_used),
                    "total": self.memory_limit}

    def op_host_alloc(self, s: SessionState, msg: dict, ident: bytes):
        size = msg["size"]
        if size == 0:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "cannot allocate 0 bytes")
        self._check_handles(s, "a mapped host allocation")
        counts = self.backend.kind == "cpu"
        if counts:
            self._charge(self._granular(size), "mapped host allocation", asked=size)
        path = None
        try:
            path, fd = self._shm_file("host", size)
            try:
                ptr = self.backend.map_file(fd, size)
            finally:
                os.close(fd)                  # the mapping stays; no fd per allocation
        except (OSError, CudaError) as e:
            if counts:
                self._uncharge(self._granular(size))
            if path is not None:
                self._shm_unlink(path)
            if isinstance(e, CudaError):
                raise
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY, f"mapped host allocation failed: {e}") from None
        s.host[ptr] = HostAlloc(size, path)
        bisect.insort(s.bases, ptr)
        return {"ptr": ptr, "path": os.path.basename(path)}

    def op_host_mapped(self, s: SessionState, msg: dict, ident: bytes):
        h = s.host.get(msg["ptr"])
        if h is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{msg['ptr']:#x} is not a mapped host allocation")
        self._shm_unlink(h.path)          # both sides have it mapped: the name can go
        return {}

    def op_host_free(self, s: SessionState, msg: dict, ident: bytes):
        ptr = msg["ptr"]
        self._check_queue(s, msg)
        h = s.host.pop(ptr, None)
        if h is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{ptr:#x} is not a mapped host allocation")
        s.bases.remove(ptr)
        self._queue_op(s, msg, ident, lambda: self._drop_host(ptr, h), release=True)
