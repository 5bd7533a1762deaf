"""Loading a built module: a private copy of the .so is dlopen'ed (each load owns its
__device__ globals), its C entry points are read through _ModuleApi, and CompiledModule keeps
its kernels and variables and unloads it when closed and idle."""
from __future__ import annotations

import _ctypes  # dlopen/dlsym/dlclose without a ctypes.CDLL (see _ModuleApi)
import ctypes
import dataclasses
import itertools
import mmap
import os
import struct
import tempfile
import threading
from pathlib import Path

from .. import sandbox as _sandbox
from .elfcheck import check_load_time_image
from .errors import KernelCompileError

_ABI_VERSION = 2  # must equal __KC_ABI in kubecash_runtime.h


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    name: str
    symbol: str
    param_sizes: tuple[int, ...]
    param_aligns: tuple[int, ...]
    cooperative: bool   # True: blocks run as fibers with barriers (module uses __syncthreads)


_module_ids = itertools.count(1)


class _ModuleApi:
    """The C entry points every module exports (see __KC_EXPORTS in the header)."""

    _SIGS = {
        "abi_version": (ctypes.c_int, []), "uses_fibers": (ctypes.c_int, []),
        "kernel_count": (ctypes.c_int, []), "var_count": (ctypes.c_int, []),
        "kernel_name": (ctypes.c_char_p, [ctypes.c_int]),
        "kernel_qualname": (ctypes.c_char_p, [ctypes.c_int]),
        "kernel_symbol": (ctypes.c_char_p, [ctypes.c_int]),
        "kernel_nparams": (ctypes.c_uint64, [ctypes.c_int]),
        "kernel_sizes": (ctypes.POINTER(ctypes.c_uint64), [ctypes.c_int]),
        "kernel_aligns": (ctypes.POINTER(ctypes.c_uint64), [ctypes.c_int]),
        "var_name": (ctypes.c_char_p, [ctypes.c_int]),
        "var_qualname": (ctypes.c_char_p, [ctypes.c_int]),
        "var_symbol": (ctypes.c_char_p, [ctypes.c_int]),
        "var_addr": (ctypes.c_void_p, [ctypes.c_int]),
        "var_size": (ctypes.c_uint64, [ctypes.c_int]),
        "run": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    }

    # Prototypes, made once (ctypes caches them). A ctypes.CDLL per module would make a new
    # function-pointer class per load, kept in reference cycles only the full garbage
    # collection frees: executors that load modules all day grew by megabytes in between.
    _PROTOS = {name: ctypes.CFUNCTYPE(restype, *argtypes)
               for name, (restype, argtypes) in _SIGS.items()}

    def __init__(self, handle: int):
        for name, proto in self._PROTOS.items():
            try:
                addr = _ctypes.dlsym(handle, "__kc_" + name)
            except OSError:
                raise KernelCompileError("not a KubeCASH CPU module (missing __kc_"
                                         f"{name})") from None
            setattr(self, name, proto(addr))
            if name == "run":
                self.run_addr = addr   # what the workers call (ctypes.cast of it makes a cycle)
        self.abi = self.abi_version


class CompiledModule:
    """A loaded module instance.  Its kernels run through a :class:`Launcher`."""

    def __init__(self) -> None:  # use compile_module()
        raise TypeError("use compile_module() to get a CompiledModule")

    @classmethod
    def _load(cls, so_path: Path, cache: Path) -> CompiledModule:
        with open(so_path, "rb") as src:
            return cls._load_image(src.read(), cache)

    @classmethod
    def _load_image(cls, image: bytes, workdir: Path | str) -> CompiledModule:
        """Load a built module's bytes (from the cache, or from the compile helper)."""
        check_load_time_image(image)   # the bytes dlopen will map, whatever their origin
        self = object.__new__(cls)
        self.footprint = image_footprint(image)
        # dlopen returns the already-loaded object for a path (or inode) it has seen, and
        # every instance must own its __device__ globals: load a private copy each time.
        fd, tmp = tempfile.mkstemp(prefix=".load-", suffix=".so", dir=workdir)
        try:
            with os.fdopen(fd, "wb") as dst:
                dst.write(image)
            handle = _ctypes.dlopen(tmp, os.RTLD_LOCAL | os.RTLD_NOW)
        finally:
            os.unlink(tmp)
        try:
            self._init(handle)
        except BaseException:
            _dlclose(handle)
            raise
        return self

    def _init(self, handle: int) -> None:
        self._handle = handle
        self._id = next(_module_ids)
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        # getattr with strings: `lib.__kc_x` inside a class body would be name-mangled.
        f = _ModuleApi(handle)
        if f.abi() != _ABI_VERSION:
            raise KernelCompileError("module built for another runtime ABI")
        self.uses_fibers = bool(f.uses_fibers())
        self.kernels: dict[str, KernelInfo] = {}
        self._index: dict[KernelInfo, int] = {}
        plain: dict[str, list[KernelInfo]] = {}
        for i in range(f.kernel_count()):
            name = f.kernel_name(i).decode()
            qual = f.kernel_qualname(i).decode()
            sym = f.kernel_symbol(i)
            sym = sym.decode() if sym else qual   # static kernels have no dynamic symbol
            n = f.kernel_nparams(i)
            sizes, aligns = f.kernel_sizes(i), f.kernel_aligns(i)
            info = KernelInfo(name, sym, tuple(sizes[k] for k in range(n)),
                              tuple(aligns[k] for k in range(n)), self.uses_fibers)
            self._index[info] = i
            self.kernels[qual] = info
            self.kernels[sym] = info
            plain.setdefault(name, []).append(info)
        for name, infos in plain.items():
            if len(infos) == 1:   # a plain name shared by kernels in two namespaces is ambiguous
                self.kernels.setdefault(name, infos[0])
        self._vars: dict[str, tuple[int, int]] = {}
        vplain: dict[str, list[tuple[int, int]]] = {}
        for i in range(f.var_count()):
            name = f.var_name(i).decode()
            qual = f.var_qualname(i).decode()
            sym = f.var_symbol(i)
            entry = (int(f.var_addr(i)), int(f.var_size(i)))
            self._vars[qual] = entry
            if sym:
                self._vars[sym.decode()] = entry
            vplain.setdefault(name, []).append(entry)
        for name, entries in vplain.items():
            if len(entries) == 1:
                self._vars.setdefault(name, entries[0])
        self._run = f.run_addr

    # -- public -------------------------------------------------------------------------
    def kernel(self, name: str) -> KernelInfo:
        try:
            return self.kernels[name]
        except KeyError:
            known = ", ".join(sorted({k.name for k in self.kernels.values()})) or "none"
            raise KeyError(f"no kernel named {name!r} in this module (kernels: {known})") from None

    def global_symbol(self, name: str) -> tuple[int, int]:
        if self._closed:
            raise KeyError(f"module is closed; no global {name!r}")
        try:
            return self._vars[name]
        except KeyError:
            known = ", ".join(sorted(self._vars)) or "none"
            raise KeyError(f"no __device__/__constant__ variable named {name!r} in this "
                           f"module (variables: {known})") from None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                return  # the last running launch unloads it
        self._unload()

    def __enter__(self) -> CompiledModule:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for Launcher -------------------------------------------------------------------
    def _acquire(self, kernel: KernelInfo) -> int:
        with self._lock:
            if self._closed:
                raise ValueError("the module has been closed")
            idx = self._index.get(kernel)
            if idx is None:
                raise ValueError(f"kernel {kernel.name!r} does not belong to this module")
            self._users += 1
            return idx

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            unload = self._closed and self._users == 0
        if unload:
            self._unload()

    def _unload(self) -> None:
        handle, self._handle, self._run = self._handle, None, None
        self._vars = {}
        if handle is not None:
            _dlclose(handle)


def _dlclose(handle: int) -> None:
    # dlclose runs the module's finalizers (destructors of function-local statics a kernel
    # constructed): tenant code, so it runs on a confined thread like the kernels.
    try:
        if _sandbox.confined_dlclose(handle):
            return
        _ctypes.dlclose(handle)
    except OSError:
        pass


def image_footprint(image: bytes) -> int:
    """The memory a loaded copy of this ELF shared object takes: its loadable segments (code,
    data and the zero-filled .bss where __device__ globals live), in whole pages."""
    if image[:4] != b"\x7fELF" or len(image) < 64 or image[4] != 2:
        raise KernelCompileError("not a 64-bit ELF shared object")
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    total = 0
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(image):
            raise KernelCompileError("truncated ELF program headers")
        p_type, = struct.unpack_from("<I", image, off)
        if p_type == 1:                                    # PT_LOAD
            vaddr, = struct.unpack_from("<Q", image, off + 16)
            memsz, = struct.unpack_from("<Q", image, off + 40)
            start = vaddr & ~(mmap.PAGESIZE - 1)
            total += -(-(vaddr + memsz - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    return total
