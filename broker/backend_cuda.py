"""The NVIDIA GPU backend: cuda-python's driver API, one context per executor (one tenant on
one device). Same methods as the CPU backend (see backend_cpu.py's docstring).

- Memory: cuMemAlloc/cuMemFree. Shared-memory segments (the per-session staging area and
  mapped host allocations) are page-locked with cuMemHostRegister(DEVICEMAP), so copies
  through them run at DMA speed and mapped host memory is zero-copy for kernels. The client
  already pipelines large copies over the two halves of its staging segment.
- Modules: PTX, CUBIN or fatbin images as the program sent them (cuModuleLoadDataEx, the JIT
  log returned on failure); CUDA C source (kubecash.client's load_module(source=...)) is
  compiled with NVRTC for this device's architecture, with the options, include check and
  CUDA include directories of the CPU backend (cpukernels: options, directives, nvrtc), so
  both accept the same source and neither compiler reads a host file for a tenant.
- Launches use the client's argument bytes; parameter sizes come from cuFuncGetParamInfo.
- Every operation completes before it returns (the executor's runner measures the lease's
  device time around it), on one stream of the executor's own.
- Context-fatal ("sticky") errors raise LaunchFailedError; the executor then exits and the
  broker tells that tenant's sessions, while other tenants' executors go on.
"""
from __future__ import annotations

import ctypes
import mmap
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubecash.client.errors import CudaError, CUresult, error_from_code

from .cpukernels import KernelCompileError, directives, parse_options
from .cpukernels import nvrtc as cpu_nvrtc
from .cpukernels.tokens import normalize_newlines

try:
    from cuda.bindings import driver as cu
    from cuda.bindings import nvrtc
except ImportError:  # pragma: no cover - only where the gpu extra is missing
    cu = None
    nvrtc = None

JIT_LOG_BYTES = 64 << 10
NVRTC_TIMEOUT_S = 60.0           # the CPU backend's compile bounds
NVRTC_MEMORY_BYTES = 2 << 30


def _check(result: tuple, what: str, *, code: int | None = None, log: str = "") -> Any:
    """cuda-python returns (err, *values): raise on error, return the value(s).

    The one place driver and NVRTC results become exceptions (error_from_code does the
    mapping). `code` replaces the driver's code where the protocol promises another (an
    unknown kernel name is NOT_FOUND); NVRTC failures are INVALID_SOURCE."""
    err, *values = result
    if int(err) != 0:
        if nvrtc is not None and isinstance(err, nvrtc.nvrtcResult):
            raise error_from_code(CUresult.CUDA_ERROR_INVALID_SOURCE if code is None else code,
                                  f"{what} failed ({err.name})", log=log)
        _, text = cu.cuGetErrorString(err)
        msg = f"{what}: {text.decode() if isinstance(text, bytes) else text}"
        raise error_from_code(int(err) if code is None else code, msg, log=log)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def available() -> bool:
    if cu is None:
        return False
    try:
        return int(cu.cuInit(0)[0]) == 0 and _check(cu.cuDeviceGetCount(), "cuDeviceGetCount") > 0
    except CudaError:
        return False


class CudaBackend:
    kind = "cuda"

    def __init__(self, device: dict, cache_dir: str):
        if cu is None:
            raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                                  "the GPU backend needs cuda-python: pip install 'kubecash[gpu]'")
        self.index = int(device["index"])
        _check(cu.cuInit(0), "cuInit")
        self.dev = _check(cu.cuDeviceGet(self.index), "cuDeviceGet")
        self.ctx = _check(cu.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._tls = threading.local()
        self._current()
        major = _check(cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "attr")
        minor = _check(cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "attr")
        self.arch = f"sm_{major}{minor}"
        self.stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self._maps: dict[int, tuple[mmap.mmap, int, int]] = {}   # device ptr -> (map, host addr, size)
        self._closed = False

    def _current(self) -> None:
        # The context must be current on each thread that calls the driver (main, runner).
        if not getattr(self._tls, "current", False):
            _check(cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
            self._tls.current = True

    def _sync(self, what: str) -> None:
        _check(cu.cuStreamSynchronize(self.stream), what)

    # -- memory -------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        self._current()
        return int(_check(cu.cuMemAlloc(size), f"cuMemAlloc({size})"))

    def free(self, ptr: int, size: int) -> None:
        self._current()
        _check(cu.cuMemFree(cu.CUdeviceptr(ptr)), "cuMemFree")

    def map_file(self, fd: int, size: int) -> int:
        """Map a shared-memory file, page-lock it and return its device address."""
        self._current()
        m = mmap.mmap(fd, size)
        host = ctypes.addressof(ctypes.c_char.from_buffer(m))
        flags = (cu.CU_MEMHOSTREGISTER_DEVICEMAP | cu.CU_MEMHOSTREGISTER_PORTABLE)
        try:
            _check(cu.cuMemHostRegister(host, size, flags), "cuMemHostRegister")
            dptr = int(_check(cu.cuMemHostGetDevicePointer(host, 0), "cuMemHostGetDevicePointer"))
        except CudaError:
            m.close()
            raise
        if dptr != host:    # every 64-bit platform CUDA supports has unified addressing
            _check(cu.cuMemHostUnregister(host), "cuMemHostUnregister")
            raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                                  "mapped host memory without unified addressing")
        self._maps[dptr] = (m, host, size)
        return dptr

    def unmap(self, ptr: int, size: int) -> None:
        self._current()
        entry = self._maps.pop(ptr, None)
        if entry is None:
            return
        m, host, _ = entry
        _check(cu.cuMemHostUnregister(host), "cuMemHostUnregister")
        try:
            m.close()
        except BufferError:
            pass   # a ctypes view still refers to it; the mapping goes with the process

    def htod(self, dst: int, src: Any, n: int) -> None:
        self._current()
        _check(cu.cuMemcpyHtoDAsync(cu.CUdeviceptr(dst), src, n, self.stream), "cuMemcpyHtoD")
        self._sync("cuMemcpyHtoD")

    def dtoh(self, dst: int, src: int, n: int) -> None:
        self._current()
        _check(cu.cuMemcpyDtoHAsync(dst, cu.CUdeviceptr(src), n, self.stream), "cuMemcpyDtoH")
        self._sync("cuMemcpyDtoH")

    def dtod(self, dst: int, src: int, n: int) -> None:
        self._current()
        _check(cu.cuMemcpyDtoDAsync(cu.CUdeviceptr(dst), cu.CUdeviceptr(src), n, self.stream),
               "cuMemcpyDtoD")
        self._sync("cuMemcpyDtoD")

    def memset(self, dst: int, value: int, width: int, count: int) -> None:
        self._current()
        fn = {1: cu.cuMemsetD8Async, 2: cu.cuMemsetD16Async, 4: cu.cuMemsetD32Async}[width]
        _check(fn(cu.CUdeviceptr(dst), value, count, self.stream), "cuMemset")
        self._sync("cuMemset")

    # -- modules --------------------------------------------------------------------------
    def load_module(self, kind: str, source: str | None, image: bytes | None,
                    options: Sequence[str]):
        self._current()
        if image is None:
            if source is None:
                raise error_from_code(CUresult.CUDA_ERROR_INVALID_VALUE, "no source or image")
            image = self._nvrtc(source, options)
        elif kind == "ptx" and not image.endswith(b"\0"):
            image = image + b"\0"            # the driver reads PTX as a C string
        log = ctypes.create_string_buffer(JIT_LOG_BYTES)
        opts = [cu.CUjit_option.CU_JIT_ERROR_LOG_BUFFER,
                cu.CUjit_option.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES]
        result = cu.cuModuleLoadDataEx(image, len(opts), opts, [ctypes.addressof(log), JIT_LOG_BYTES])
        text = log.value.decode(errors="replace")
        first = f" ({text.splitlines()[0]})" if text else ""
        module = _check(result, f"cuModuleLoadDataEx{first}", log=text)
        return {"module": module, "ptx": image if kind == "ptx" else None}

    def _nvrtc(self, source: str, options: Sequence[str]) -> bytes:
        """A CUBIN for this device, under the CPU backend's checks and in NVRTC's confined
        child (nvrtc.py): this executor runs as root with the host's view."""
        source = normalize_newlines(source)
        try:
            checked = parse_options(options)
            directives.check_directives(source, cpu_nvrtc.include_dirs(),
                                        digit_separators=checked.std not in ("c++03", "c++11"))
            # The checked options, for this device's real architecture: a CUBIN, not PTX.
            args = [f"--gpu-architecture={self.arch}", *checked.args[1:]]
            with tempfile.TemporaryDirectory(prefix="kubecash-nvrtc-") as work:
                return cpu_nvrtc.to_cubin(source, args, deadline=time.monotonic() + NVRTC_TIMEOUT_S,
                                          memory_limit_bytes=NVRTC_MEMORY_BYTES, cwd=work)
        except KernelCompileError as e:
            raise error_from_code(e.code, e.message, log=e.log) from None

    def unload_module(self, module) -> None:
        self._current()
        _check(cu.cuModuleUnload(module["module"]), "cuModuleUnload")

    def get_function(self, module, name: str):
        self._current()
        fn = _check(cu.cuModuleGetFunction(module["module"], name.encode()),
                    f"no kernel named '{name}' in the module", code=CUresult.CUDA_ERROR_NOT_FOUND)
        return fn, self._param_sizes(fn, module, name)

    def _param_sizes(self, fn, module, name: str) -> tuple[int, ...]:
        sizes = []
        for i in range(4096):
            # a probe, not an error path: the first index past the last parameter fails
            err, _offset, size = cu.cuFuncGetParamInfo(fn, i)
            if int(err) != 0:
                if i == 0 and int(err) == CUresult.CUDA_ERROR_NOT_SUPPORTED and module["ptx"]:
                    return _ptx_param_sizes(module["ptx"], name)
                break
            sizes.append(int(size))
        return tuple(sizes)

    def get_global(self, module, name: str) -> tuple[int, int]:
        self._current()
        ptr, size = _check(cu.cuModuleGetGlobal(module["module"], name.encode()),
                           f"no global variable named '{name}'", code=CUresult.CUDA_ERROR_NOT_FOUND)
        return int(ptr), int(size)

    def launch(self, function, grid, block, shared: int, args: Sequence[bytes], *,
               should_yield: Callable[[], bool] | None = None,
               progress: list[int] | None = None, cooperative: bool = False) -> bool:
        """Run a kernel to completion (a GPU kernel cannot be suspended mid-grid)."""
        self._current()
        bufs = [ctypes.create_string_buffer(a, len(a)) for a in args]
        ptrs = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(b) for b in bufs])
        if cooperative:     # the GPU checks the grid against what it holds resident
            _check(cu.cuLaunchCooperativeKernel(function, *grid, *block, shared, self.stream,
                                                ctypes.addressof(ptrs)), "cuLaunchCooperativeKernel")
        else:
            _check(cu.cuLaunchKernel(function, *grid, *block, shared, self.stream, ctypes.addressof(ptrs), 0),
                   "cuLaunchKernel")
        self._sync("kernel")
        return True

    def synchronize(self) -> None:
        self._current()
        self._sync("cuStreamSynchronize")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._current()
            for ptr in list(self._maps):
                self.unmap(ptr, 0)
            _check(cu.cuStreamDestroy(self.stream), "cuStreamDestroy")
        finally:
            _check(cu.cuDevicePrimaryCtxRelease(self.dev), "cuDevicePrimaryCtxRelease")


_ENTRY = re.compile(rb"\.entry\s+(\S+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(rb"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+\S+?(?:\[(\d+)\])?\s*(?:,|$)")
_PTX_SIZES = {b"b8": 1, b"u8": 1, b"s8": 1, b"b16": 2, b"u16": 2, b"s16": 2, b"f16": 2,
              b"b32": 4, b"u32": 4, b"s32": 4, b"f32": 4, b"b64": 8, b"u64": 8, b"s64": 8, b"f64": 8}


def _ptx_param_sizes(ptx: bytes, name: str) -> tuple[int, ...]:
    """Parameter sizes from a PTX `.entry` declaration (for drivers without cuFuncGetParamInfo)."""
    for m in _ENTRY.finditer(ptx):
        if m.group(1).decode() != name:
            continue
        sizes = []
        for p in _PARAM.finditer(m.group(2) + b","):
            n = _PTX_SIZES.get(p.group(2))
            if n is None:
                raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                                      f"PTX parameter type .{p.group(2).decode()} of {name}")
            sizes.append(n * int(p.group(3) or 1))
        return tuple(sizes)
    raise error_from_code(CUresult.CUDA_ERROR_NOT_SUPPORTED,
                          f"cannot tell the parameter sizes of {name}")

