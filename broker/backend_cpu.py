"""The CPU backend: device memory is the executor's own memory, kernels are CUDA C compiled
for the host (kubecash.broker.cpukernels) and run across the executor's worker threads.

Every backend offers the same methods; the executor calls nothing else:
    alloc(size) -> ptr           free(ptr, size)
    map_file(fd, size) -> ptr    unmap(ptr, size)          (shared host memory)
    htod(dst, host_addr, n)      dtoh(host_addr, src, n)    dtod(dst, src, n)
    memset(dst, value, width, count)
    load_module(kind, source, image, options) -> module    unload_module(module)
    get_function(module, name) -> (function, param_sizes)  get_global(module, name) -> (ptr, size)
    launch(function, grid, block, shared, args)            synchronize()   close()
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubecash.client.errors import CUresult, error_from_code

from . import cpukernels
from .arena import Arena
from .ptx import fatbin

log = logging.getLogger("kubecash.executor")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
SLICE_NS = 1_000_000        # a preemptible kernel checks for preemption about every 1 ms


def _mmap(size: int, fd: int = -1) -> int:
    flags = mmap.MAP_SHARED if fd >= 0 else (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # MAP_NORESERVE: quota accounting is ours; do not let overcommit heuristics refuse.
    addr = _libc.mmap(None, max(size, 1), mmap.PROT_READ | mmap.PROT_WRITE,
                      flags | getattr(mmap, "MAP_NORESERVE", 0), fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise error_from_code(CUresult.CUDA_ERROR_OUT_OF_MEMORY,
                      f"host mmap of {size} bytes failed: {os.strerror(err)}")
    return addr


class CpuBackend:
    kind = "cpu"

    def __init__(self, threads: int, cache_dir: str, *, sandbox: bool = True,
                 on_sandbox_violation: Callable[[str, int, str], None] | None = None,
                 compile_helper: Any = None, module_dir: str | None = None):
        """sandbox: kernels run on seccomp-confined threads (kubecash.broker.sandbox); a
        kernel's refused system call calls on_sandbox_violation(message, nr, name), after
        which the process ends by SIGSYS. compile_helper: a compile_helper.CompileHelper that
        builds modules (else they are built in this process, into cache_dir); module_dir:
        where loaded modules' private copies go (default cache_dir)."""
        self.threads = max(1, threads)
        self.cache_dir = cache_dir
        self.compile_helper = compile_helper
        self.module_dir = module_dir or cache_dir
        self.launcher = cpukernels.Launcher(self.threads, nice=10, sandbox=sandbox,
                                            cache_dir=cache_dir)
        if sandbox and on_sandbox_violation is not None:
            from . import sandbox as _sandbox
            _sandbox.set_violation_handler(on_sandbox_violation)
        self.arena: Arena | None = None   # set by the executor once it has made one
        self._closed = False

    # -- memory -------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        if self.arena is not None:
            try:
                ptr = self.arena.alloc(size)
            except OSError as e:
                raise error_from_code(CUresult.CUDA_ERROR_OUT_OF_MEMORY,
                                      f"cannot back {size} bytes in the tenant's shm directory: "
                                      f"{e.strerror}") from None
            if ptr is not None:
                return ptr
            # Within the quota (checked before) but no room left in the address space:
            # a private mapping still works, its copies go through the executor.
            log.warning("arena full for %d bytes: a private mapping instead", size)
        return _mmap(size)

    def free(self, ptr: int, size: int) -> None:
        if self.arena is not None and self.arena.owns(ptr):
            self.arena.free(ptr)
        else:
            _libc.munmap(ptr, max(size, 1))

    def map_file(self, fd: int, size: int) -> int:
        return _mmap(size, fd)

    def unmap(self, ptr: int, size: int) -> None:
        _libc.munmap(ptr, max(size, 1))

    def htod(self, dst: int, host_addr: int, n: int) -> None:
        ctypes.memmove(dst, host_addr, n)

    dtoh = htod
    dtod = htod

    def memset(self, dst: int, value: int, width: int, count: int) -> None:
        if width == 1:
            ctypes.memset(dst, value & 0xFF, count)
            return
        nbytes = width * count
        if nbytes == 0:
            return
        ctypes.memmove(dst, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"), width)
        done = width
        while done < nbytes:               # doubling copies: log2(count) memmoves
            step = min(done, nbytes - done)
            ctypes.memmove(dst + done, dst, step)
            done += step

    # -- modules and launches -------------------------------------------------------------
    def load_module(self, kind: str, source: str | None, image: bytes | None,
                    options: Sequence[str]) -> cpukernels.CompiledModule:
        # CUDA C source goes through NVRTC to PTX; PTX is translated (broker/ptx), from a
        # fatbin its best PTX entry. SASS (a CUBIN, a fatbin without PTX) cannot run here.
        language = "cuda-c"
        if source is None and image is not None:
            source, language = (_ptx_text(image) if kind == "ptx" else _ptx_of_image(image)), "ptx"
        if source is None:
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_VALUE, "no source or image")
        if self.compile_helper is not None:
            image = self.compile_helper.build(source, options, COMPILE_TIMEOUT_S, language)
        else:
            image = build_image(source, options, cache_dir=self.cache_dir, timeout_s=COMPILE_TIMEOUT_S,
                                language=language)
        try:
            return cpukernels.CompiledModule._load_image(image, self.module_dir)
        except cpukernels.KernelCompileError as e:
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_SOURCE, f"module does not load: {e}") from None

    def unload_module(self, module: cpukernels.CompiledModule) -> None:
        module.close()

    def get_function(self, module: cpukernels.CompiledModule, name: str):
        try:
            k = module.kernel(name)
        except KeyError:
            raise error_from_code(CUresult.CUDA_ERROR_NOT_FOUND,
                          f"no kernel named '{name}' in the module (it has: "
                          f"{', '.join(sorted(set(k.name for k in module.kernels.values())))})") from None
        return (module, k), k.param_sizes

    def get_global(self, module: cpukernels.CompiledModule, name: str) -> tuple[int, int]:
        try:
            return module.global_symbol(name)
        except KeyError:
            raise error_from_code(CUresult.CUDA_ERROR_NOT_FOUND,
                          f"no global variable named '{name}' in the module") from None

    def launch(self, function, grid, block, shared: int, args: Sequence[bytes], *,
               should_yield: Callable[[], bool] | None = None,
               progress: list[int] | None = None, cooperative: bool = False) -> bool:
        """Run a kernel; True when it has completed.

        With `should_yield`, the grid runs in slices of about SLICE_NS, and between slices
        the kernel stops if should_yield() says so, returning False with the next block in
        progress[0]; calling again with the same progress resumes it. Blocks are
        independent, so a latency tenant need not wait for a long kernel to end.
        `cooperative`: the whole grid resident at once (never sliced)."""
        module, kernel = function
        grid, block = tuple(grid), tuple(block)
        try:
            if cooperative:
                self.launcher.launch(module, kernel, grid, block, shared, args, cooperative=True)
                return True
            if should_yield is None:
                self.launcher.launch(module, kernel, grid, block, shared, args)
                return True
            total = grid[0] * grid[1] * grid[2]
            progress = progress if progress is not None else [0]
            step = self.threads               # first slice: one block per worker, timed
            while progress[0] < total:
                first = progress[0]
                last = min(total, first + step)
                t0 = time.perf_counter_ns()
                self.launcher.launch(module, kernel, grid, block, shared, args,
                                     first_block=first, last_block=last)
                took = max(1, time.perf_counter_ns() - t0)
                progress[0] = last
                step = max(self.threads, int((last - first) * SLICE_NS / took))
                if progress[0] < total and should_yield():
                    return False
            return True
        except cpukernels.CoopTooLarge as e:
            raise error_from_code(CUresult.CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, str(e)) from None
        except ValueError as e:
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_VALUE, str(e)) from None

    def synchronize(self) -> None:
        pass  # launches and copies complete before they return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.launcher.close()
            if self.arena is not None:
                self.arena.close()


COMPILE_TIMEOUT_S = 60.0


def build_image(source: str, options: Sequence[str], *, cache_dir: str, timeout_s: float,
                language: str = "cuda-c") -> bytes:
    """CUDA C source or PTX text to the bytes of its built module (CudaError when it does
    not build)."""
    try:
        path = cpukernels.build_module(source, options, cache_dir=cache_dir, timeout_s=timeout_s,
                                       language=language)
        with open(path, "rb") as f:
            return f.read()
    except cpukernels.UnsupportedConstructError as e:
        raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                      f"the CPU backend does not support {e.construct}", log=e.log) from None
    except cpukernels.KernelCompileError as e:
        if e.code != CUresult.CUDA_ERROR_INVALID_SOURCE:    # INVALID_PTX, NOT_SUPPORTED (no NVRTC)
            raise error_from_code(e.code, e.message, log=e.log) from None
        raise error_from_code(CUresult.CUDA_ERROR_INVALID_SOURCE,
                      "module does not compile: " + _first_error(e.log), log=e.log) from None


def _ptx_text(image: bytes) -> str:
    """A PTX image is text, often NUL-terminated (as cuModuleLoadData takes it)."""
    text = bytes(image).split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise error_from_code(CUresult.CUDA_ERROR_INVALID_PTX, "the PTX image is not UTF-8 text") from None


def _ptx_of_image(image: bytes) -> str:
    """The PTX to run from a fatbin (its best PTX entry, broker/ptx/fatbin.py) or a CUBIN
    (none: NO_BINARY_FOR_GPU naming what it held)."""
    try:
        return fatbin.ptx_from_image(bytes(image))
    except fatbin.NoPtxError as e:
        raise error_from_code(CUresult.CUDA_ERROR_NO_BINARY_FOR_GPU,
                              f"{e} (build it with PTX: a compute_XX architecture, nvcc's default)") from None
    except fatbin.FatbinFormatError as e:
        raise error_from_code(CUresult.CUDA_ERROR_INVALID_IMAGE, f"module image: {e}") from None


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error" in line:
            return line.strip()[:500]
    return (log.strip().splitlines() or ["(no compiler output)"])[0][:500]
