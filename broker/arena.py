"""The CPU backend's device memory: one arena per (tenant, device), a sparse shared file in the
tenant's shm/ directory that the executor and the tenant's clients both map, so a client's
synchronous copy is one memcpy into or out of device memory itself (#17).

Allocations are sub-allocated from it (Allocator: first fit, coalescing); freed pages are
punched out of the file so the tenant's tmpfs gets them back. The quota is charged by the
executor as before; the arena's size is only address space."""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
from collections.abc import Callable

ALIGN = 256                 # what cuMemAlloc guarantees
PAGE = mmap.PAGESIZE
ARENA_MIN = 64 << 30        # address space only: a sparse file, nothing backed until touched
ARENA_FACTOR = 4            # x the quota: first fit within a quota this far below never fails in practice
ARENA_MAX = 1 << 44         # 16 TiB: one slot of the region below
# Where arenas go: 16 TiB slots from 16 TiB up, far below where any process's mmap area and
# libraries live (the top of a 47-bit address space) and above its heap. A program maps the
# arena at the same address (native/src/session.c), so a device pointer is the very memory
# there and can never be one of its host addresses; a kernel-chosen address would be in the
# program's own mmap area, where its libraries and buffers already are.
SLOT = 1 << 44
SLOTS = 6
MAP_FIXED, MAP_FIXED_NOREPLACE = 0x10, 0x100000     # Linux, every architecture it runs on
PROT_NONE = 0                                      # which the mmap module does not name
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
log = logging.getLogger("kubecash.executor")


def _place(fd: int, size: int) -> int | None:
    """Map the arena in the first free slot (its start varies with the process, so a tenant's
    arenas on two devices do not contend for one slot in a program that maps both), else
    wherever the kernel puts it."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    first = os.getpid() % SLOTS
    # A random 2 MiB-aligned start inside the slot, as ASLR would: two executors' arenas
    # (each in its own process) then do not share addresses, and a pointer of one tenant's
    # is no valid pointer of another's.
    room = max(0, (SLOT - size) // (2 << 20))
    jitter = int.from_bytes(os.urandom(8), "little") % (room + 1) * (2 << 20)
    for k in range(SLOTS):
        want = SLOT * (1 + (first + k) % SLOTS) + jitter
        addr = _libc.mmap(want, size, prot, flags | MAP_FIXED_NOREPLACE, fd, 0)
        if addr not in (None, _MAP_FAILED):
            if addr == want:
                return addr
            _libc.munmap(addr, size)             # an old kernel took it as a hint
    return _libc.mmap(None, size, prot, flags, fd, 0)


def arena_size(memory_limit: int) -> int:
    """Virtual size for a quota: room enough that fragmentation never refuses what the quota
    allows (first fit's worst case needs a multiple of the live bytes), 2 MiB-aligned."""
    size = min(ARENA_MAX, max(ARENA_MIN, ARENA_FACTOR * memory_limit))
    return -(-size // (2 << 20)) * (2 << 20)


def alignment(size: int) -> int:
    """256 bytes (CUDA's), but a page for page-sized and larger allocations and the next power
    of two for smaller ones: no allocation then touches more pages than it is charged for."""
    if size >= PAGE:
        return PAGE
    return max(ALIGN, 1 << (max(size, 1) - 1).bit_length())


class Allocator:
    """First-fit sub-allocation of [0, size): free ranges kept sorted by start, coalesced on
    free. O(free ranges) per allocation; enough for the handles a session may hold."""

    def __init__(self, size: int):
        self.size = size
        self._starts: list[int] = [0]          # free ranges, sorted
        self._free: dict[int, int] = {0: size}  # start -> length
        self.used: dict[int, int] = {}          # allocated offset -> length (rounded)

    def alloc(self, size: int, align: int | None = None, origin: int = 0) -> int | None:
        """The offset of `size` bytes (aligned as alignment() says, or `origin` + it aligned to
        `align`: an address, where the range starts at `origin`), or None if nothing fits."""
        align = align or alignment(size)
        n = -(-max(size, 1) // ALIGN) * ALIGN
        for i, start in enumerate(self._starts):
            length = self._free[start]
            off = -(-(origin + start) // align) * align - origin
            if off + n > start + length:
                continue
            del self._starts[i], self._free[start]
            if off > start:                     # the alignment gap stays free
                self._insert(start, off - start)
            if off + n < start + length:
                self._insert(off + n, start + length - off - n)
            self.used[off] = n
            return off
        return None

    def free(self, off: int) -> tuple[int, int] | None:
        """Free the allocation at `off`; the coalesced free range now holding it, or None if
        `off` is not an allocation."""
        n = self.used.pop(off, None)
        if n is None:
            return None
        start, end = off, off + n
        i = bisect.bisect_left(self._starts, start)
        if i > 0:                               # merge with the free range before
            prev = self._starts[i - 1]
            if prev + self._free[prev] == start:
                start = prev
                del self._starts[i - 1], self._free[prev]
                i -= 1
        if i < len(self._starts) and self._starts[i] == end:   # and the one after
            end += self._free.pop(end)
            del self._starts[i]
        self._insert(start, end - start)
        return start, end

    def _insert(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._free[start] = length

    def free_ranges(self) -> list[tuple[int, int]]:
        return [(s, self._free[s]) for s in self._starts]


class Arena:
    """The mapped arena file: base address in this process, its path and fd-less mapping."""

    def __init__(self, path: str, fd: int, size: int, unlink: Callable[[str], None] = os.unlink):
        """`fd`: the arena file, open read-write and sized `size` (sparse); kept open to punch.
        `unlink` removes `path` at close (the executor's: never through a tenant's symlink)."""
        addr = _place(fd, size)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of a {size}-byte arena: "
                                              f"{os.strerror(ctypes.get_errno())}")
        self.path, self.fd, self.size, self.base = path, fd, size, addr
        self._unlink = unlink
        self.allocator = Allocator(size)
        self._lock = threading.Lock()     # allocations on the main thread, frees on the runner

    def alloc(self, size: int) -> int | None:
        """The address of `size` bytes, backed now (OSError when the file system has no room:
        never a SIGBUS later in whoever touches a page), or None when no range fits."""
        with self._lock:
            off = self.allocator.alloc(size)
            if off is None:
                return None
            lo, hi = off // PAGE * PAGE, -(-(off + max(size, 1)) // PAGE) * PAGE
            if _libc.fallocate(self.fd, FALLOC_FL_KEEP_SIZE, lo, hi - lo) != 0:
                err = ctypes.get_errno()
                self._free_locked(off)
                raise OSError(err, os.strerror(err))
            return self.base + off

    def owns(self, ptr: int) -> bool:
        with self._lock:
            return (ptr - self.base) in self.allocator.used

    def free(self, ptr: int) -> None:
        """Free an allocation (owns(ptr) must hold); its whole pages go back to the file system."""
        with self._lock:
            self._free_locked(ptr - self.base)

    def _free_locked(self, off: int) -> None:
        rng = self.allocator.free(off)
        if rng is None:
            return
        lo, hi = -(-rng[0] // PAGE) * PAGE, rng[1] // PAGE * PAGE
        if hi > lo and _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                       lo, hi - lo) != 0:
            # Not fatal: the pages stay counted in tmpfs until reused (they are still ours).
            log.warning("arena: punching %d bytes failed: %s", hi - lo,
                        os.strerror(ctypes.get_errno()))

    # -- virtual memory management (cuMemAddressReserve, cuMemCreate, cuMemMap) ----------
    # A reservation is a range of the arena's address space whose identity mapping is
    # replaced by an inaccessible one (touching it faults, as an unmapped GPU address does);
    # a physical allocation is a range of the arena file, allocated as alloc() does; a
    # mapping puts file pages at a reserved address. The client mirrors each step.
    def reserve(self, size: int, align: int) -> int | None:
        """`size` bytes of address space aligned to `align`, or None when no range fits."""
        with self._lock:
            off = self.allocator.alloc(size, align, origin=self.base)   # the address is aligned
            if off is None:
                return None
            try:
                self._fixed(self.base + off, size, PROT_NONE, anonymous=True)
            except OSError:
                self.allocator.free(off)
                raise
            return self.base + off

    def unreserve(self, ptr: int, size: int) -> None:
        """Give a reservation back: the arena's own pages are mapped there again."""
        with self._lock:
            self._fixed(ptr, size, mmap.PROT_READ | mmap.PROT_WRITE, offset=ptr - self.base)
            self._free_locked(ptr - self.base)

    def map_pages(self, ptr: int, size: int, file_offset: int) -> None:
        """Put the file's pages at [file_offset, +size) at `ptr`, inaccessible until protect()."""
        self._fixed(ptr, size, PROT_NONE, offset=file_offset)

    def unmap_pages(self, ptr: int, size: int) -> None:
        self._fixed(ptr, size, PROT_NONE, anonymous=True)

    def protect(self, ptr: int, size: int, prot: int) -> None:
        if _libc.mprotect(ptr, size, prot) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect {ptr:#x}+{size}: {os.strerror(err)}")

    def _fixed(self, ptr: int, size: int, prot: int, *, offset: int = 0, anonymous: bool = False) -> None:
        """mmap MAP_FIXED over [ptr, ptr+size), which must lie inside the arena."""
        if not (self.base <= ptr and ptr + size <= self.base + self.size):
            raise OSError(22, f"{ptr:#x}+{size} is outside the arena")
        flags = MAP_FIXED | getattr(mmap, "MAP_NORESERVE", 0) | (
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if anonymous else mmap.MAP_SHARED)
        addr = _libc.mmap(ptr, size, prot, flags, -1 if anonymous else self.fd, offset)
        if addr != ptr:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap at {ptr:#x}+{size}: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd < 0:
            return
        _libc.munmap(self.base, self.size)
        os.close(self.fd)
        self.fd = -1
        try:
            self._unlink(self.path)
        except FileNotFoundError:
            pass
