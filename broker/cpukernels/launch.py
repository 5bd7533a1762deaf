"""Launching kernels: Launcher runs a kernel's blocks on N persistent native worker threads
(kubecash.broker.sandbox.WorkerPool: each confined by a seccomp filter before it runs tenant
code). Each worker calls the module's __kc_run, grabbing block indices from one shared atomic
counter; its reusable state (dynamic shared memory, fiber stacks) is a _WorkerState."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence

from kubecash.client.errors import CudaError, E, error_from_code, error_string

from .. import sandbox as _sandbox
from ..sandbox import array_type
from .loader import CompiledModule, KernelInfo

MAX_SHARED_BYTES = 48 * 1024
# A cooperative launch's blocks are all resident at once, each worker's share as fibers:
# at most this many threads per worker (each a fiber stack and a guard page, two of the
# process's memory mappings: vm.max_map_count is 65530 by default).
MAX_COOP_FIBERS = 8192
class CoopTooLarge(ValueError):
    """A cooperative grid whose share puts more than MAX_COOP_FIBERS threads on a worker."""


_COOP_WINDOW = 96 * 1024    # kCoopWindow in kubecash_runtime.h: static + dynamic shared
_COOP_STRIDE = _COOP_WINDOW + 64   # kCoopStride: the window and the block's BlockRun
_MAX_BLOCK_THREADS = 1024
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)


_DEADLOCK = -5   # kDeadlock in kubecash_runtime.h: a block no lane of which can go on
_DEVICE_ERROR = -6   # kDeviceError: a trap or failed assert, recorded in the _KcDeviceError


class _KcDeviceError(ctypes.Structure):
    """DeviceError in kubecash_runtime.h: the first trap / failed assert of a launch."""
    _fields_ = [("claimed", ctypes.c_uint32), ("code", ctypes.c_int32),
                ("message", ctypes.c_char * 1024)]


class _KcLaunch(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3),
                ("nblocks", ctypes.c_uint64), ("next_block", ctypes.c_void_p),
                ("shared_bytes", ctypes.c_uint64), ("module_id", ctypes.c_uint64),
                ("error", ctypes.c_void_p), ("coop", ctypes.c_uint64), ("workspace", ctypes.c_void_p)]


class _KcWorker(ctypes.Structure):
    _fields_ = [("shared", ctypes.c_void_p), ("stacks", ctypes.c_void_p),
                ("slot_size", ctypes.c_uint64), ("guard_size", ctypes.c_uint64),
                ("nslots", ctypes.c_uint64), ("nfibers", ctypes.c_uint64),
                ("owner_module", ctypes.c_uint64), ("owner_thread", ctypes.c_void_p),
                ("coop_area", ctypes.c_void_p), ("coop_blocks", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)   # the process's own libc; no find_library run
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE


def _map_private(length: int, what: str) -> int:
    """Anonymous read-write memory, not reserved (touched pages only)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if addr in (None, _MAP_FAILED):
        raise MemoryError(f"cannot map {length} bytes of {what}: {os.strerror(ctypes.get_errno())}")
    return addr


class _WorkerState:
    """One worker thread's reusable resources: dynamic shared memory and fiber stacks."""

    def __init__(self, stack_bytes: int):
        self.c = _KcWorker()
        self._shared = ctypes.create_string_buffer(MAX_SHARED_BYTES + 64)
        base = ctypes.addressof(self._shared)
        self.c.shared = base + (-base) % 64   # 16-byte alignment promised; 64 for __align__
        self.slot_size = _PAGE + -(-stack_bytes // _PAGE) * _PAGE
        self.stacks = 0
        self.map_len = 0
        self.coop = 0
        self.coop_len = 0

    def ensure_coop(self, blocks: int) -> None:
        """Room for `blocks` resident blocks of a cooperative launch (their shared windows)."""
        if self.c.coop_blocks >= blocks:
            return
        self.free_coop()
        length = blocks * _COOP_STRIDE
        addr = _map_private(length, "shared windows")
        self.coop, self.coop_len = addr, length
        self.c.coop_area, self.c.coop_blocks = addr, blocks

    def free_coop(self) -> None:
        if self.coop:
            _libc.munmap(self.coop, self.coop_len)
        self.coop, self.coop_len = 0, 0
        self.c.coop_area, self.c.coop_blocks = None, 0

    def ensure_stacks(self, need: int) -> None:
        if self.c.nslots >= need:
            return
        n = max(32, 1 << (need - 1).bit_length())   # a block's threads, or a cooperative share
        self.free_stacks()
        length = n * self.slot_size
        addr = _map_private(length, "fiber stacks")
        self.stacks, self.map_len = addr, length
        for i in range(n):  # a guard page under each stack turns overflow into a fault
            if _libc.mprotect(addr + i * self.slot_size, _PAGE, 0) != 0:
                err = ctypes.get_errno()    # (ENOMEM: past vm.max_map_count) none kept
                self.free_stacks()
                raise OSError(err, f"mprotect of fiber guard page {i} of {n} failed")
        c = self.c
        c.stacks, c.slot_size, c.guard_size, c.nslots = addr, self.slot_size, _PAGE, n
        c.nfibers, c.owner_module, c.owner_thread = 0, 0, None

    def free_stacks(self) -> None:
        if self.stacks:
            _libc.munmap(self.stacks, self.map_len)
        self.stacks, self.map_len = 0, 0
        c = self.c
        c.stacks, c.nslots, c.nfibers, c.owner_module, c.owner_thread = None, 0, 0, 0, None


def _dims(v, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        t = tuple(v)
    except TypeError:
        raise ValueError(f"{what} must be a tuple of 3 integers, got {v!r}") from None
    if len(t) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        raise ValueError(f"{what} must be a tuple of 3 integers, got {v!r}")
    for x, lim, axis in zip(t, limits, "xyz", strict=False):
        if not 1 <= x <= lim:
            raise ValueError(f"{what}.{axis} = {x} is out of range (1..{lim})")
    return t  # type: ignore[return-value]


class Launcher:
    """A persistent pool of worker threads that run kernels' blocks."""

    def __init__(self, nthreads: int, *, fiber_stack_bytes: int = 64 << 10, nice: int = 0,
                 sandbox: bool = True, cache_dir: os.PathLike | str | None = None):
        """nthreads native worker threads (kubecash.broker.sandbox.WorkerPool). With `sandbox`
        (the default) each is confined by a seccomp filter before it runs any kernel; nice
        lowers their priority so the control plane sharing the cores goes first; cache_dir
        keeps the built sandbox runtime."""
        if not isinstance(nthreads, int) or nthreads < 1:
            raise ValueError(f"nthreads must be a positive integer, got {nthreads!r}")
        if fiber_stack_bytes < 32 << 10:
            raise ValueError("fiber_stack_bytes must be at least 32 KiB")
        self._lock = threading.Lock()   # one launch at a time uses the workers
        self._closed = False
        self._workers = [_WorkerState(fiber_stack_bytes) for _ in range(nthreads)]
        self._pool = _sandbox.WorkerPool([ctypes.addressof(w.c) for w in self._workers], nice=nice,
                                         sandbox=sandbox, cache_dir=cache_dir)
        self.sandboxed = sandbox

    @property
    def nthreads(self) -> int:
        return len(self._workers)

    def coop_share(self, grid: tuple[int, int, int], block: tuple[int, int, int]) -> tuple[int, int]:
        """A cooperative launch of grid x block: (workers, blocks resident on each)."""
        total = grid[0] * grid[1] * grid[2]
        nw = min(len(self._workers), total)
        return nw, -(-total // nw)

    def launch(self, module: CompiledModule, kernel: KernelInfo, grid: tuple[int, int, int],
               block: tuple[int, int, int], shared_bytes: int, args: Sequence[bytes], *,
               first_block: int = 0, last_block: int | None = None, cooperative: bool = False) -> None:
        """Run the kernel over the grid; returns when every block has run.

        With first_block/last_block, only the blocks of linear index [first, last) run: a
        kernel can be run in slices (blocks are independent), so it can yield the device
        between slices. `cooperative`: every block of the grid is resident at once (as
        cuLaunchCooperativeKernel promises, for grid-wide barriers): the whole grid, each
        worker's share as fibers that take turns; at most MAX_COOP_FIBERS threads a worker."""
        # Everything is validated before anything runs.
        grid = _dims(grid, "grid", _MAX_GRID)
        block = _dims(block, "block", _MAX_BLOCK)
        threads = block[0] * block[1] * block[2]
        if threads > _MAX_BLOCK_THREADS:
            raise ValueError(f"block has {threads} threads; at most {_MAX_BLOCK_THREADS} are allowed")
        if not isinstance(shared_bytes, int) or isinstance(shared_bytes, bool) or shared_bytes < 0:
            raise ValueError(f"shared_bytes must be a non-negative integer, got {shared_bytes!r}")
        if shared_bytes > MAX_SHARED_BYTES:
            raise ValueError(f"shared_bytes = {shared_bytes} exceeds the {MAX_SHARED_BYTES} byte "
                             "(48 KiB) limit on dynamic shared memory")
        if not isinstance(kernel, KernelInfo):
            raise ValueError(f"kernel must be a KernelInfo, got {type(kernel).__name__}")
        per_worker = 0
        if cooperative:
            if first_block != 0 or last_block is not None:
                raise ValueError("a cooperative launch runs its whole grid at once")
            nw_coop, per_worker = self.coop_share(grid, block)
            if per_worker * threads > MAX_COOP_FIBERS:
                raise CoopTooLarge(f"a cooperative grid of {grid[0] * grid[1] * grid[2]} blocks of {threads} "
                                   f"threads puts {per_worker * threads} threads on each of {nw_coop} "
                                   f"workers; at most {MAX_COOP_FIBERS} can be resident on one")
        argbuf, argv = _pack_args(kernel, args)
        with self._lock:
            if self._closed:
                raise RuntimeError("the Launcher has been closed")
            idx = module._acquire(kernel)
            try:
                run = module._run
                total = grid[0] * grid[1] * grid[2]
                nblocks = total if last_block is None else last_block
                if not 0 <= first_block < nblocks <= total:
                    raise ValueError(f"block range [{first_block}, {nblocks}) outside the "
                                     f"grid's {total} blocks")
                # Workers grab block indices from the counter until it reaches nblocks.
                counter = ctypes.c_uint64(first_block)
                fault = _KcDeviceError()
                workspace = (ctypes.c_uint64 * 2)()    # the grid barrier's words, zeroed
                L = _KcLaunch((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block),
                              nblocks, ctypes.addressof(counter), shared_bytes, module._id,
                              ctypes.addressof(fault), per_worker,
                              ctypes.addressof(workspace) if cooperative else None)
                nw = min(len(self._workers), nblocks - first_block)
                if module.uses_fibers:     # the workers are idle: set up their stacks here
                    for w in self._workers[:nw]:
                        w.ensure_stacks(threads * per_worker if cooperative else threads)
                        if cooperative:
                            w.ensure_coop(per_worker)
                # Blocks until every worker is done (the GIL is released for the call).
                rcs = self._pool.run(run, idx,
                                     ctypes.addressof(argv), ctypes.addressof(L), nw)
                del argbuf, counter, L, workspace  # kept alive until every worker has finished
            finally:
                module._release()
        if _DEVICE_ERROR in rcs:
            raise _device_error(fault)
        for rc in rcs:
            if rc == _DEADLOCK:     # on a GPU it would hang until the watchdog: its code, sticky
                raise error_from_code(E.CUDA_ERROR_LAUNCH_TIMEOUT,
                                      "kernel deadlocked: every live thread of a block waits on an mbarrier "
                                      "that cannot complete")
            if rc != 0:
                raise RuntimeError(f"kernel block runner failed (code {rc})")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pool.close()
            for w in self._workers:
                w.free_stacks()
                w.free_coop()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _device_error(fault: _KcDeviceError) -> CudaError:
    """The launch's trap or failed assert as the (sticky) CudaError CUDA reports for it."""
    code = fault.code if fault.claimed else int(E.CUDA_ERROR_LAUNCH_FAILED)
    text = fault.message.decode(errors="replace") or "device-side error"
    return error_from_code(code, f"{error_string(code)}: {text}")


def _pack_args(kernel: KernelInfo, args: Sequence[bytes]):
    """Copy each argument into storage aligned for its parameter; returns (buffer, void*[])."""
    sizes, aligns = kernel.param_sizes, kernel.param_aligns
    try:
        args = list(args)
    except TypeError:
        raise ValueError("args must be a sequence of byte strings") from None
    if len(args) != len(sizes):
        raise ValueError(f"kernel {kernel.name!r} takes {len(sizes)} parameters, got {len(args)} arguments")
    blobs, offsets, off = [], [], 0
    for i, (a, size, align) in enumerate(zip(args, sizes, aligns, strict=False)):
        if isinstance(a, (int, float, str)) or a is None:
            raise ValueError(f"argument {i} must be raw bytes, got {type(a).__name__}")
        try:
            b = memoryview(a).cast("B").tobytes()
        except TypeError:
            raise ValueError(f"argument {i} must be raw bytes, got {type(a).__name__}") from None
        if len(b) != size:
            raise ValueError(f"argument {i} of kernel {kernel.name!r} is {len(b)} bytes; "
                             f"the parameter is {size} bytes")
        off = -(-off // align) * align
        offsets.append(off)
        blobs.append(b)
        off += size
    maxalign = max([16, *aligns])
    buf = array_type(ctypes.c_char, 1 << (off + maxalign - 1).bit_length())()
    base = ctypes.addressof(buf)
    base += (-base) % maxalign
    for o, b in zip(offsets, blobs, strict=False):
        ctypes.memmove(base + o, b, len(b))
    argv = array_type(ctypes.c_void_p, max(1, len(sizes)))(*[base + o for o in offsets])
    return (buf, argv), argv
