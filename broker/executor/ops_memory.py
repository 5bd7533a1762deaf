"""Operations on memory: attach (the staging segment), device and mapped host allocations."""
from __future__ import annotations

import bisect
import os

from kubecash.client.errors import CudaError, E

from .state import (
    HostAlloc,
    SessionState,
    _err,
)


class MemoryOps:
    # -- operations: each op_<name> handles the request of that name ----------------------
    def op_attach(self, s: SessionState, msg: dict, ident: bytes):
        if s.staging is None:
            path, fd = self._shm_file("staging", self.staging_bytes)
            s.staging_path = path
            try:
                s.staging = (self.backend.map_file(fd, self.staging_bytes), self.staging_bytes)
            finally:
                os.close(fd)
        else:
            path = ""
        return {"staging": os.path.basename(path), "staging_size": self.staging_bytes,
                "memory_limit": self.memory_limit, "device": self.device,
                "max_queued_ops": self.limits.max_queued_ops_per_session,
                "max_message_bytes": self.max_message_bytes}

    def op_mem_alloc(self, s: SessionState, msg: dict, ident: bytes):
        size = msg["size"]
        if size == 0:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, "cannot allocate 0 bytes")
        self._check_handles(s, "an allocation")
        self._charge(size, "allocation")
        try:
            ptr = self.backend.alloc(size)
        except CudaError:
            self._uncharge(size)
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
            self._uncharge(size)
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
            self._charge(size, "mapped host allocation")
        path = None
        try:
            path, fd = self._shm_file("host", size)
            try:
                ptr = self.backend.map_file(fd, size)
            finally:
                os.close(fd)                  # the mapping stays; no fd per allocation
        except (OSError, CudaError) as e:
            if counts:
                self._uncharge(size)
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
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
        try:                               # both sides have it mapped: the name can go
            os.unlink(h.path)
        except FileNotFoundError:
            pass
        return {}

    def op_host_free(self, s: SessionState, msg: dict, ident: bytes):
        ptr = msg["ptr"]
        self._check_queue(s, msg)
        h = s.host.pop(ptr, None)
        if h is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"{ptr:#x} is not a mapped host allocation")
        s.bases.remove(ptr)
        self._queue_op(s, msg, ident, lambda: self._drop_host(ptr, h), release=True)
