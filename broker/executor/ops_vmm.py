"""Virtual memory management (cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess,
cuMemUnmap, cuMemRelease, cuMemAddressFree) on a CPU device's arena (broker/arena.py).

A reservation is address space inside the arena, inaccessible until mapped; a physical
allocation is a range of the arena file, charged to the quota like any allocation; a mapping
puts its pages at a reserved address, so two mappings of one allocation alias as on a GPU.
The session's tables change when a request arrives (later requests are checked against
them); unmapping, access changes and frees are queued behind the session's earlier work, so
what was submitted before them still sees the memory it was submitted for.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import mmap
from collections.abc import Callable

from kubecash.client.errors import E
from kubecash.client.limits import VMM_GRANULARITY

from ..arena import PROT_NONE
from .state import SessionState, _err

G = VMM_GRANULARITY
READ, READ_WRITE = 1, 3            # CUmemAccess_flags
# Each mapping is one of the executor process's own (vm.max_map_count is 65530 by default,
# and the executor needs its own): a bound per executor, well under it.
MAX_MAPPINGS = 16384
_HANDLES = itertools.count(1)      # one process, one device: unique across its sessions
_PROT = {0: PROT_NONE, READ: mmap.PROT_READ, READ_WRITE: mmap.PROT_READ | mmap.PROT_WRITE}


@dataclasses.dataclass
class Physical:
    ptr: int                 # its pages' own place in the arena (never handed out)
    size: int
    mappings: int = 0
    released: bool = False


@dataclasses.dataclass
class Mapping:
    size: int
    handle: int
    access: int = 0


@dataclasses.dataclass
class Reservation:
    size: int
    maps: dict[int, Mapping] = dataclasses.field(default_factory=dict)
    starts: list[int] = dataclasses.field(default_factory=list)      # sorted keys of maps

    def covering(self, ptr: int, n: int) -> list[int] | None:
        """The starts of the mappings that cover [ptr, ptr+n) with no gap, or None."""
        out, end = [], ptr + max(n, 1)
        i = bisect.bisect_right(self.starts, ptr) - 1
        while ptr < end:
            if i < 0 or i >= len(self.starts):
                return None
            m0 = self.starts[i]
            if not m0 <= ptr < m0 + self.maps[m0].size:
                return None
            out.append(m0)
            ptr, i = m0 + self.maps[m0].size, i + 1
        return out


def _granular(what: str, value: int, zero_ok: bool = False) -> None:
    if value % G or (value == 0 and not zero_ok):
        raise _err(E.CUDA_ERROR_INVALID_VALUE,
                   f"{what} {value:#x} is not a{'' if zero_ok else ' non-zero'} multiple of the "
                   f"allocation granularity ({G} bytes, cuMemGetAllocationGranularity)")


class VmmOps:
    vmm_mappings = 0                  # mappings held by all sessions (MAX_MAPPINGS bounds it)

    def _vmm_arena(self, call: str):
        arena = self._arena()
        if arena is None:
            raise _err(E.CUDA_ERROR_NOT_SUPPORTED,
                       f"{call}: virtual memory management is supported on CPU devices with a "
                       f"memory arena; {self.dev_name} has none")
        return arena

    def _reservation(self, s: SessionState, ptr: int, n: int, call: str) -> tuple[int, Reservation]:
        i = bisect.bisect_right(s.bases, ptr) - 1
        base = s.bases[i] if i >= 0 else None
        r = s.vmm.get(base)
        if r is None or ptr + n > base + r.size:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{call}: {ptr:#x}+{n} is not inside one address range this session reserved")
        return base, r

    def _whole_mappings(self, s: SessionState, ptr: int, n: int, call: str) -> tuple[Reservation, list[int]]:
        _, r = self._reservation(s, ptr, n, call)
        starts = r.covering(ptr, n)
        if not starts or starts[0] != ptr or starts[-1] + r.maps[starts[-1]].size != ptr + n:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{call}: {ptr:#x}+{n} is not a run of whole mappings (cuMemMap) with no gap")
        return r, starts

    def _vmm_check(self, s: SessionState, base: int, ptr: int, n: int, what: str) -> None:
        """_check_range for an address inside a reservation: mapped, and accessible."""
        r = s.vmm[base]
        need = READ if what == "source" else READ_WRITE
        starts = r.covering(ptr, n) if ptr + n <= base + r.size else None
        if starts is None:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{what} range {ptr:#x}+{n} is not all mapped (cuMemMap) in its reserved range "
                       f"{base:#x}+{r.size}")
        for m0 in starts:
            if r.maps[m0].access & need != need:
                raise _err(E.CUDA_ERROR_INVALID_VALUE,
                           f"{what} range {ptr:#x}+{n}: the mapping at {m0:#x} is not "
                           f"{'readable' if need == READ else 'writable'} (cuMemSetAccess)")

    # -- operations ----------------------------------------------------------------------
    def op_vmm_reserve(self, s: SessionState, msg: dict, ident: bytes):
        arena = self._vmm_arena("cuMemAddressReserve")
        size, align = msg["size"], msg.get("align") or G
        _granular("size", size)
        if align & (align - 1):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"alignment {align} is not a power of two")
        self._check_handles(s, "an address reservation")
        ptr = arena.reserve(size, max(align, G))
        if ptr is None:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cannot reserve {size} bytes: no free range that large is left in "
                       f"{self.dev_name}'s address space of {arena.size} bytes")
        s.vmm[ptr] = Reservation(size)
        bisect.insort(s.bases, ptr)
        return {"ptr": ptr}

    def op_vmm_free(self, s: SessionState, msg: dict, ident: bytes):
        ptr, size = msg["ptr"], msg["size"]
        r = s.vmm.get(ptr)
        if r is None or r.size != size:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemAddressFree: {ptr:#x}+{size} is not an address range this session "
                       "reserved (the size must be the reserved size)")
        if r.maps:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemAddressFree: {len(r.maps)} mapping(s) are still in {ptr:#x}+{size}; "
                       "cuMemUnmap them first")
        self._check_queue(s, msg)
        del s.vmm[ptr]
        s.bases.remove(ptr)
        arena = self.backend.arena
        self._queue_op(s, msg, ident, lambda: arena.unreserve(ptr, size), release=True)

    def op_vmm_create(self, s: SessionState, msg: dict, ident: bytes):
        arena = self._vmm_arena("cuMemCreate")
        size = msg["size"]
        _granular("size", size)
        self._check_handles(s, "a physical allocation")
        charged = self._granular(size)
        self._charge(charged, "physical allocation (cuMemCreate)", asked=size)
        try:
            ptr = arena.alloc(size)
        except OSError as e:
            ptr = None
            why = f"cannot back it in the tenant's shm directory: {e.strerror}"
        else:
            why = "no free range that large is left in the arena"
        if ptr is None:
            self._uncharge(charged)
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY, f"cuMemCreate of {size} bytes: {why}")
        handle = next(_HANDLES)
        s.vmm_phys[handle] = Physical(ptr, size)
        return {"handle": handle}

    def _physical(self, s: SessionState, handle: int, call: str) -> Physical:
        p = s.vmm_phys.get(handle)
        if p is None or p.released:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"{call}: {handle:#x} is not a physical allocation handle of this session "
                       "(cuMemCreate), or it was released")
        return p

    def _drop_physical(self, s: SessionState, handle: int) -> Callable[[], None]:
        """The last reference to a physical allocation is gone: queue its memory's return."""
        p = s.vmm_phys.pop(handle)
        arena = self.backend.arena

        def free() -> None:
            arena.free(p.ptr)
            self._uncharge(self._granular(p.size))
        return free

    def op_vmm_release(self, s: SessionState, msg: dict, ident: bytes):
        p = self._physical(s, msg["handle"], "cuMemRelease")
        self._check_queue(s, msg)
        p.released = True
        if p.mappings == 0:
            self._queue_op(s, msg, ident, self._drop_physical(s, msg["handle"]), release=True)
        else:
            return {}                 # it goes with its last mapping

    def op_vmm_map(self, s: SessionState, msg: dict, ident: bytes):
        ptr, size, offset, handle = msg["ptr"], msg["size"], msg["offset"], msg["handle"]
        for what, v in (("address", ptr), ("size", size)):
            _granular(what, v)
        _granular("offset", offset, zero_ok=True)
        _, r = self._reservation(s, ptr, size, "cuMemMap")
        p = self._physical(s, handle, "cuMemMap")
        if offset + size > p.size:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemMap: offset {offset} + size {size} runs past the physical allocation "
                       f"of {p.size} bytes")
        i = bisect.bisect_left(r.starts, ptr)
        if (i < len(r.starts) and r.starts[i] < ptr + size) or (
                i > 0 and r.starts[i - 1] + r.maps[r.starts[i - 1]].size > ptr):
            raise _err(E.CUDA_ERROR_INVALID_VALUE, f"cuMemMap: {ptr:#x}+{size} overlaps a mapping")
        self._check_handles(s, "a mapping")
        if self.vmm_mappings >= MAX_MAPPINGS:
            raise _err(E.CUDA_ERROR_OUT_OF_MEMORY,
                       f"cuMemMap: {self.vmm_mappings} mappings are held on {self.dev_name}, at most "
                       f"{MAX_MAPPINGS} may be (each is a mapping of the executor's own)")
        self._check_queue(s, msg)
        arena = self.backend.arena
        file_offset = p.ptr - arena.base + offset
        m = r.maps[ptr] = Mapping(size, handle)
        r.starts.insert(i, ptr)
        p.mappings += 1
        self.vmm_mappings += 1

        def do_map() -> dict:             # in queue order: an unmap queued before it runs first
            try:
                arena.map_pages(ptr, size, file_offset)
            except OSError as e:
                self._call_in_main(lambda: self._vmm_unmapped(s, r, ptr, m))
                raise _err(E.CUDA_ERROR_OUT_OF_MEMORY, f"cuMemMap: {e}") from None
            return {"file_offset": file_offset}
        self._queue_op(s, msg, ident, do_map)

    def _vmm_unmapped(self, s: SessionState, r: Reservation, ptr: int, m: Mapping) -> None:
        """A mapping that could not be made leaves the tables (main thread)."""
        if r.maps.get(ptr) is not m:
            return
        del r.maps[ptr]
        r.starts.remove(ptr)
        self.vmm_mappings -= 1
        p = s.vmm_phys[m.handle]
        p.mappings -= 1
        if p.released and p.mappings == 0:
            self._drop_physical(s, m.handle)()     # never mapped anywhere now: nothing uses it

    def op_vmm_unmap(self, s: SessionState, msg: dict, ident: bytes):
        ptr, size = msg["ptr"], msg["size"]
        r, starts = self._whole_mappings(s, ptr, size, "cuMemUnmap")
        self._check_queue(s, msg)
        frees = []
        for m0 in starts:
            m = r.maps.pop(m0)
            self.vmm_mappings -= 1
            p = s.vmm_phys[m.handle]
            p.mappings -= 1
            if p.released and p.mappings == 0:
                frees.append(self._drop_physical(s, m.handle))
        r.starts = [x for x in r.starts if x in r.maps]
        arena = self.backend.arena

        def unmap() -> None:
            arena.unmap_pages(ptr, size)
            for f in frees:
                f()
        self._queue_op(s, msg, ident, unmap, release=True)

    def op_vmm_access(self, s: SessionState, msg: dict, ident: bytes):
        ptr, size, access = msg["ptr"], msg["size"], msg["access"]
        if access not in _PROT:
            raise _err(E.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemSetAccess: access flags {access} (0 none, 1 read, 3 read-write)")
        r, starts = self._whole_mappings(s, ptr, size, "cuMemSetAccess")
        self._check_queue(s, msg)
        for m0 in starts:
            r.maps[m0].access = access
        arena = self.backend.arena
        self._queue_op(s, msg, ident, lambda: arena.protect(ptr, size, _PROT[access]))

    def _release_vmm(self, s: SessionState) -> None:
        """A session's reservations and physical allocations go with it (accounting._release)."""
        arena = self.backend.arena
        for ptr, r in s.vmm.items():
            arena.unreserve(ptr, r.size)          # its mappings go with it
            self.vmm_mappings -= len(r.maps)
        s.vmm.clear()
        for p in s.vmm_phys.values():
            arena.free(p.ptr)
            self._uncharge(self._granular(p.size))
        s.vmm_phys.clear()
