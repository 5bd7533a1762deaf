"""The program's CUDA state as the shim keeps it: one KubeCASH session, the devices it
offers, contexts, and tables from the handles the program holds to executor handles.

The shim decides nothing about quotas: every allocation, launch and copy is a request to
the tenant's executor, which grants or refuses it. What is kept here is bookkeeping only
(which device a handle belongs to, what a pinned host pointer maps to).
"""
from __future__ import annotations

import atexit
import bisect
import ctypes
import dataclasses
import itertools
import os
import threading
from typing import Any

import kubecash.client as kc
from kubecash.client.errors import CudaError, E

from .images import Registry


@dataclasses.dataclass
class Ctx:
    handle: int
    dev: int
    primary: bool
    flags: int = 0
    alive: bool = True


@dataclasses.dataclass
class Pinned:
    """Pinned host memory: shared with the executor (cuMemAllocHost & co.)."""
    local: int                    # this process's address
    size: int
    dev: int
    buf: kc.HostBuffer
    anchor: Any                   # keeps the ctypes export of the mapping alive
    ctx: int
    flags: int = 0


@dataclasses.dataclass
class Registered:
    """cuMemHostRegister'ed memory: bookkeeping only (copies from it are staged)."""
    local: int
    size: int
    flags: int


@dataclasses.dataclass
class Alloc:
    dev: int
    size: int
    ctx: int
    pooled: bool = False          # from cuMemAllocAsync / cudaMallocAsync
    buffer_id: int = 0            # CU_POINTER_ATTRIBUTE_BUFFER_ID: never reused in the process


@dataclasses.dataclass
class Func:
    dev: int
    handle: int                   # executor function handle
    name: str
    param_sizes: tuple[int, ...] | None
    module: int                   # shim module handle


@dataclasses.dataclass
class Mod:
    dev: int
    module: kc.Module
    ctx: int
    signatures: dict[str, tuple[int, ...]] | None


@dataclasses.dataclass
class MemPool:
    """A device's memory pool as the program sees it (cuMemPool*, cudaMemPool*): its handle,
    attributes and use; the memory itself is ordinary allocations on the device."""
    dev: int
    handle: int = 0               # the program's CUmemoryPool / cudaMemPool_t
    attrs: dict[int, int] = dataclasses.field(default_factory=dict)
    used: int = 0
    used_high: int = 0


class State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.session: kc.Session | None = None
        self.devices: list[kc.Device] = []
        self.init_error: CudaError | None = None
        self.images = Registry()
        self._ids = itertools.count(0x5000_0000)
        self.tls = threading.local()
        self.contexts: dict[int, Ctx] = {}
        self.primary: dict[int, Ctx] = {}
        self.primary_refs: dict[int, int] = {}
        self.allocs: dict[int, Alloc] = {}
        self.pinned: dict[int, Pinned] = {}        # local address -> allocation
        self._pinned_bases: list[int] = []
        self.registered: dict[int, Registered] = {}
        self.modules: dict[int, Mod] = {}
        self.functions: dict[int, Func] = {}
        self.streams: dict[int, tuple[int, kc.Stream, int]] = {}   # shim -> (dev, stream, ctx)
        self.stream_flags: dict[int, int] = {}                     # shim stream -> its flags
        self._buffer_ids = itertools.count(1)
        self.events: dict[int, tuple[int, kc.Event, int]] = {}
        self.pools: dict[int, MemPool] = {}
        self.device_flags: dict[int, int] = {}
        self._atexit = False

    # -- initialisation ---------------------------------------------------------------
    def new_handle(self) -> int:
        return next(self._ids)

    def init(self) -> None:
        """cuInit: open the session with the broker named by $KUBECASH_BROKER (once)."""
        with self.lock:
            if self.session is not None:
                return
            if self.init_error is not None:
                raise self.init_error
            address = os.environ.get(kc.ENV_BROKER)
            if not address:
                self.init_error = CudaError(E.CUDA_ERROR_NO_DEVICE,
                                            f"{kc.ENV_BROKER} is not set: no brokered device")
                raise self.init_error
            if address.startswith("ipc://") and not os.path.exists(address[len("ipc://"):]):
                # No socket there: say so at once rather than after the hello timeout.
                self.init_error = CudaError(E.CUDA_ERROR_NO_DEVICE,
                                            f"no KubeCASH broker socket at {address}")
                raise self.init_error
            try:
                self.session = kc.connect(address)
            except kc.KubecashError as e:
                self.init_error = CudaError(E.CUDA_ERROR_NO_DEVICE,
                                            f"cannot reach the KubeCASH broker at {address}: {e}")
                raise self.init_error from None
            self.devices = self.session.devices
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True

    def need_init(self) -> None:
        if self.session is None:
            raise CudaError(E.CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called")

    def close(self) -> None:
        with self.lock:
            s, self.session = self.session, None
            for p in list(self.pinned.values()):
                p.anchor = None
            self.pinned.clear()
            self._pinned_bases.clear()
        if s is not None:
            try:
                s.close()
            except Exception:
                pass

    def device(self, ordinal: Any) -> int:
        self.need_init()
        try:
            i = int(ordinal)
        except (TypeError, ValueError):
            raise CudaError(E.CUDA_ERROR_INVALID_DEVICE, f"not a device: {ordinal!r}") from None
        if not 0 <= i < len(self.devices):
            raise CudaError(E.CUDA_ERROR_INVALID_DEVICE,
                            f"device {i} does not exist (this tenant has {len(self.devices)})")
        return i

    # -- contexts ---------------------------------------------------------------------
    def _stack(self) -> list[int]:
        st = getattr(self.tls, "stack", None)
        if st is None:
            st = self.tls.stack = []
        return st

    def current(self) -> Ctx | None:
        st = self._stack()
        while st:
            c = self.contexts.get(st[-1])
            if c is not None and c.alive:
                return c
            st.pop()
        return None

    def ctx(self) -> Ctx:
        """The current context, as driver calls that need one require."""
        self.need_init()
        c = self.current()
        if c is None:
            raise CudaError(E.CUDA_ERROR_INVALID_CONTEXT, "no current context "
                            "(cuCtxCreate, cuCtxSetCurrent or cuDevicePrimaryCtxRetain first)")
        return c

    def runtime_ctx(self) -> Ctx:
        """The runtime API's implicit context: the current one, else device 0's primary."""
        self.init()
        c = self.current()
        if c is None:
            dev = getattr(self.tls, "runtime_device", 0)
            c = self.primary_ctx(self.device(dev))
            self.set_current(c)
        return c

    def primary_ctx(self, dev: int) -> Ctx:
        with self.lock:
            c = self.primary.get(dev)
            if c is None:
                c = Ctx(self.new_handle(), dev, True, self.device_flags.get(dev, 0))
                self.primary[dev] = c
                self.contexts[c.handle] = c
            return c

    def set_current(self, c: Ctx | None) -> None:
        st = self._stack()
        if st:
            st.pop()
        if c is not None:
            st.append(c.handle)

    def context(self, handle: Any) -> Ctx:
        h = int(handle or 0)
        c = self.contexts.get(h)
        if c is None or not c.alive:
            raise CudaError(E.CUDA_ERROR_INVALID_CONTEXT, f"context {h:#x} is not valid")
        return c

    def destroy_resources(self, ctx: int) -> None:
        """What a destroyed context (or a reset device) owned goes with it, as in CUDA."""
        for h, (_dev, st, owner) in list(self.streams.items()):
            if owner == ctx:
                self.streams.pop(h, None)
                self.stream_flags.pop(h, None)
                st.close()
        for h, (_dev, ev, owner) in list(self.events.items()):
            if owner == ctx:
                self.events.pop(h, None)
                ev.close()
        for h, m in list(self.modules.items()):
            if m.ctx == ctx:
                self.drop_module(h)
        for ptr, a in list(self.allocs.items()):
            if a.ctx == ctx:
                self.free(ptr)
        for p in list(self.pinned.values()):
            if p.ctx == ctx:
                self.free_pinned(p.local)

    # -- devices of handles ----------------------------------------------------------------
    def dev(self, i: int) -> kc.Device:
        return self.devices[i]

    def stream(self, handle: Any, default_dev: int) -> tuple[int, kc.Stream | None]:
        """(device, client stream or None for the default stream) of a CUstream argument."""
        h = _handle_int(handle)
        if h in (0, 1, 2):            # NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
            return default_dev, None
        entry = self.streams.get(h)
        if entry is None:
            raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"stream {h:#x} is not valid")
        return entry[0], entry[1]

    def event(self, handle: Any) -> tuple[int, kc.Event]:
        h = _handle_int(handle)
        entry = self.events.get(h)
        if entry is None:
            raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"event {h:#x} is not valid")
        return entry[0], entry[1]

    def function(self, handle: Any) -> Func:
        h = _handle_int(handle)
        f = self.functions.get(h)
        if f is None:
            raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"function {h:#x} is not valid")
        return f

    def module(self, handle: Any) -> Mod:
        h = _handle_int(handle)
        m = self.modules.get(h)
        if m is None:
            raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"module {h:#x} is not valid")
        return m

    def drop_module(self, h: int) -> None:
        m = self.modules.pop(h, None)
        if m is None:
            raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"module {h:#x} is not valid")
        for fh in [fh for fh, f in self.functions.items() if f.module == h]:
            del self.functions[fh]
        m.module.close()

    def pointer_device(self, ptr: int, default: int) -> int:
        """The device a device pointer belongs to (its allocation's), else `default`."""
        a = self.alloc_containing(ptr)
        if a is not None:
            return a[1].dev
        p = self.pinned_by_exec(ptr)
        return p.dev if p is not None else default

    def alloc_containing(self, ptr: int) -> tuple[int, Alloc] | None:
        a = self.allocs.get(ptr)
        if a is not None:
            return ptr, a
        for base, a in self.allocs.items():       # interior pointers (few allocations)
            if base <= ptr < base + a.size:
                return base, a
        return None

    # -- memory -------------------------------------------------------------------------
    def alloc(self, dev: int, size: Any, ctx: int, pooled: bool = False) -> int:
        n = int(size)
        if n <= 0:
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "allocation size must be positive")
        ptr = self.dev(dev).request("mem_alloc", size=n)["ptr"]
        self.allocs[ptr] = Alloc(dev, n, ctx, pooled, next(self._buffer_ids))
        if pooled:
            pool = self.pool(dev)
            pool.used += n
            pool.used_high = max(pool.used_high, pool.used)
        return ptr

    def free(self, ptr: Any) -> None:
        p = _handle_int(ptr)
        if p == 0:
            return                                  # cuMemFree(0) / cudaFree(0): no-op
        a = self.allocs.get(p)
        if a is None:
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                            f"{p:#x} is not the start of a device allocation")
        self.dev(a.dev).request("mem_free", ptr=p)   # runs after the work queued before it
        del self.allocs[p]
        if a.pooled:
            self.pool(a.dev).used -= a.size

    def pool(self, dev: int) -> MemPool:
        p = self.pools.get(dev)
        if p is None:
            p = self.pools[dev] = MemPool(dev)
        return p

    def alloc_pinned(self, dev: int, size: Any, ctx: int, flags: int = 0) -> int:
        n = int(size)
        if n <= 0:
            raise CudaError(E.CUDA_ERROR_INVALID_VALUE, "allocation size must be positive")
        buf = self.dev(dev).allocate_host(n)
        anchor = (ctypes.c_char * n).from_buffer(buf.mapping)
        local = ctypes.addressof(anchor)
        with self.lock:
            self.pinned[local] = Pinned(local, n, dev, buf, anchor, ctx, flags)
            bisect.insort(self._pinned_bases, local)
        return local

    def free_pinned(self, addr: int) -> None:
        with self.lock:
            p = self.pinned.pop(addr, None)
            if p is None:
                raise CudaError(E.CUDA_ERROR_INVALID_VALUE,
                                f"{addr:#x} is not the start of pinned host memory")
            self._pinned_bases.remove(addr)
            p.anchor = None                         # release the export before unmapping
        p.buf.close()

    def pinned_at(self, addr: int, n: int = 1) -> Pinned | None:
        """The pinned allocation holding [addr, addr+n), if any."""
        with self.lock:
            i = bisect.bisect_right(self._pinned_bases, addr) - 1
            if i < 0:
                return None
            p = self.pinned[self._pinned_bases[i]]
            return p if addr + max(n, 1) <= p.local + p.size else None

    def pinned_by_exec(self, ptr: int) -> Pinned | None:
        for p in self.pinned.values():
            if p.buf.ptr <= ptr < p.buf.ptr + p.size:
                return p
        return None

    def registered_at(self, addr: int) -> Registered | None:
        for r in self.registered.values():
            if r.local <= addr < r.local + r.size:
                return r
        return None


def _handle_int(h: Any) -> int:
    if h is None:
        return 0
    if isinstance(h, int):
        return h
    try:
        return int(h)
    except (TypeError, ValueError):
        raise CudaError(E.CUDA_ERROR_INVALID_HANDLE, f"not a handle: {h!r}") from None


handle_int = _handle_int
STATE = State()
