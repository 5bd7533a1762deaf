"""NVRTC, NVIDIA's CUDA C++ compiler as a library: a module's CUDA C source becomes PTX, which
the CPU backend translates like any PTX a program hands it (kubecash.broker.ptx). The CPU
device so accepts exactly the CUDA C a GPU accepts through NVRTC.

The library and the CUDA headers (cuda_fp16.h, cooperative_groups.h, cuda/barrier, ...) come
from NVIDIA's wheels (nvidia-cuda-nvrtc, -runtime, -cccl) or a toolkit, found by
cuda.pathfinder: NVIDIA's own search order over wheels, conda and CUDA_HOME, kept up with their
packaging (hand-written globbing would lag it). There are no NVRTC builds for riscv64: there,
CUDA C source is refused with NOT_SUPPORTED and programs load PTX.

Each compile runs in a forked child under the build's time and memory bounds (a template bomb
must not take the compile helper with it); the child writes the result to a pipe. The compile
helper is single-threaded, so the fork is safe; call `prepare()` before it loses its view of
the host (it loads the library and says which directories the view must show).

The child reads files through a Landlock ruleset: the CUDA include directories and nothing
else, read-only. Checks of the source text cannot stop NVRTC reading host files (a tenant's
macro names the file an allowed header includes: CCCL has dozens of `#include MACRO`), and a
broker that is not root has no view to hide them in. Where the kernel has no Landlock, only a
compile helper with a view of its own (a root broker) compiles CUDA C."""
from __future__ import annotations

import ctypes
import glob
import os
import resource
import signal
import struct
import time

import msgpack

from kubecash.client.errors import E

from .errors import KernelCompileError

_MAX_LOG_CHARS = 1 << 20        # compiler messages kept (a bomb can print a lot)
_MAX_PTX_BYTES = 256 << 20      # what the child may send back
_lib: ctypes.CDLL | None = None
_lib_path = ""
_include_dirs: list[str] = []
in_view = False                 # set by the compile helper once it has entered its own view

# Landlock (linux/landlock.h): the syscalls and the file-system access rights.
_SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "riscv64": (444, 445, 446)}
_LL_READ = (1 << 2) | (1 << 3)              # READ_FILE, READ_DIR
_LL_V1_ALL = (1 << 13) - 1                  # every right of ABI 1 (execute, write, make_*, ...)
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15


def _unavailable(why: str) -> KernelCompileError:
    return KernelCompileError(f"CUDA C source needs NVRTC, which {why}; load the module as PTX instead",
                              code=E.CUDA_ERROR_NOT_SUPPORTED)


def _load() -> ctypes.CDLL:
    global _lib, _lib_path, _include_dirs
    if _lib is not None:
        return _lib
    try:
        import cuda.pathfinder as pathfinder
    except ImportError:
        raise _unavailable("is not installed (pip install 'kubecash[broker]')") from None
    try:
        loaded = pathfinder.load_nvidia_dynamic_lib("nvrtc")
    except Exception as e:   # noqa: BLE001  (pathfinder raises several kinds: all mean "none here")
        raise _unavailable(f"was not found on this machine ({e})") from None
    lib = ctypes.CDLL(loaded.abs_path)
    # NVRTC dlopens its builtins at the first compile: load them now, while they can be found.
    for b in sorted(glob.glob(os.path.join(os.path.dirname(loaded.abs_path), "libnvrtc-builtins.so*"))):
        ctypes.CDLL(b)
    dirs = []
    for name in ("cudart", "cccl"):
        try:
            d = pathfinder.find_nvidia_header_directory(name)
        except Exception:   # noqa: BLE001
            d = None
        if d and os.path.isdir(d):
            dirs.append(os.path.realpath(d))
    for fn, res, args in (
            ("nvrtcCreateProgram", ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
            ("nvrtcCompileProgram", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
            ("nvrtcGetPTXSize", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
            ("nvrtcGetPTX", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
            ("nvrtcGetCUBINSize", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
            ("nvrtcGetCUBIN", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
            ("nvrtcGetProgramLogSize", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
            ("nvrtcGetProgramLog", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
            ("nvrtcDestroyProgram", ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p)]),
            ("nvrtcGetErrorString", ctypes.c_char_p, [ctypes.c_int]),
            ("nvrtcVersion", ctypes.c_int, [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib, _lib_path, _include_dirs = lib, os.path.realpath(loaded.abs_path), dirs
    return lib


def prepare() -> list[str]:
    """Load NVRTC now; the directories a confined compile must see (the library's, the
    headers'). Empty where there is no NVRTC: CUDA C is then refused at build time."""
    try:
        _load()
    except KernelCompileError:
        return []
    return [os.path.dirname(_lib_path), *_include_dirs]


def include_dirs() -> list[str]:
    _load()
    return list(_include_dirs)


def identity() -> str:
    """What a cached build depends on besides the source: the NVRTC build and its headers."""
    lib = _load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    st = os.stat(_lib_path)
    return f"nvrtc {major.value}.{minor.value} {_lib_path}:{st.st_size}:{st.st_mtime_ns} {_include_dirs}"


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (an old kernel, Landlock off,
    qemu-user, which does not implement it). Asks only (LANDLOCK_CREATE_RULESET_VERSION)."""
    import platform
    nrs = _SYS_LANDLOCK.get(platform.machine())
    if nrs is None:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(ctypes.c_long(nrs[0]), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _landlock(readable: list[str]) -> bool:
    """Restrict this process (the NVRTC child) to reading `readable`; False where the kernel
    has no Landlock. Irreversible: call only in the child."""
    import platform
    abi = landlock_abi()
    if abi < 1:
        return False
    create, add_rule, restrict = _SYS_LANDLOCK[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    handled = _LL_V1_ALL | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) \
        | (_LL_IOCTL_DEV if abi >= 5 else 0)
    attr = struct.pack("<Q", handled)
    fd = libc.syscall(ctypes.c_long(create), attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        return False
    for d in readable:
        try:
            pfd = os.open(d, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = struct.pack("<Qi", _LL_READ, pfd)          # struct landlock_path_beneath_attr (packed)
        rc = libc.syscall(ctypes.c_long(add_rule), ctypes.c_int(fd), ctypes.c_int(1), rule, ctypes.c_uint32(0))
        os.close(pfd)
        if rc < 0:
            os.close(fd)
            return False
    if libc.prctl(38, 1, 0, 0, 0) != 0:                    # PR_SET_NO_NEW_PRIVS
        return False
    ok = libc.syscall(ctypes.c_long(restrict), ctypes.c_int(fd), ctypes.c_uint32(0)) == 0
    os.close(fd)
    return ok


def _compile(source: str, args: list[str], cubin: bool) -> tuple[bool, str | bytes, str]:
    """In the child: (ok, the PTX text or the CUBIN's bytes, log)."""
    lib = _load()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None)
    if rc:
        return False, "", f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}"
    try:
        argv = (ctypes.c_char_p * len(args))(*(a.encode() for a in args))
        rc = lib.nvrtcCompileProgram(prog, len(args), argv)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(max(n.value, 1))
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode("utf-8", "replace")[-_MAX_LOG_CHARS:]
        if rc:
            return False, "", log
        if cubin:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(max(n.value, 1))
            lib.nvrtcGetCUBIN(prog, buf)
            return True, buf.raw[:n.value], log
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(max(n.value, 1))
        lib.nvrtcGetPTX(prog, buf)
        return True, buf.value.decode("utf-8", "replace"), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_UNCONFINED = ("NVRTC would read host files unconfined: this kernel has no Landlock and the broker is not "
               "root (no compile view); load PTX instead")


def _read_all(fd: int, deadline: float, pid: int) -> bytes:
    import select
    out = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > _MAX_PTX_BYTES + _MAX_LOG_CHARS * 4 + 64:
            raise KernelCompileError(f"module does not compile (NVRTC's output exceeds {_MAX_PTX_BYTES >> 20} MiB)")


def to_ptx(source: str, args: list[str], *, deadline: float, memory_limit_bytes: int, cwd: str) -> str:
    """PTX for CUDA C `source` compiled with NVRTC options `args` (checked ones: options.py),
    in a child bounded by `deadline` and `memory_limit_bytes`; KernelCompileError otherwise."""
    return _run(source, args, deadline=deadline, memory_limit_bytes=memory_limit_bytes, cwd=cwd, cubin=False)


def to_cubin(source: str, args: list[str], *, deadline: float, memory_limit_bytes: int, cwd: str) -> bytes:
    """As to_ptx, for a real architecture (--gpu-architecture=sm_XX): the CUBIN (the GPU
    backend: its executors run as root with the host's view, so they need the child's
    confinement most)."""
    return _run(source, args, deadline=deadline, memory_limit_bytes=memory_limit_bytes, cwd=cwd, cubin=True)


def _address_space() -> int:
    """This process's mapped address space in bytes (what RLIMIT_AS counts)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _run(source: str, args: list[str], *, deadline: float, memory_limit_bytes: int, cwd: str,
         cubin: bool):
    _load()
    args = [*args, *(f"--include-path={d}" for d in _include_dirs)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: bounded, answers once, never returns
        code = 0
        try:
            os.close(r)
            os.chdir(cwd)   # a quoted #include looks next to the source first: an empty place
            # The bound is on what NVRTC adds: a forked child starts with its parent's address
            # space (a client's mapped 64 GiB device arena, say), which counts against RLIMIT_AS.
            lim = _address_space() + memory_limit_bytes
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                lim = min(lim, hard)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            try:
                if not _landlock([*_include_dirs, os.path.dirname(_lib_path)]) and not in_view:
                    ok, ptx, log = False, "", _UNCONFINED
                else:
                    ok, ptx, log = _compile(source, args, cubin)
                msg = msgpack.packb([ok, ptx, log])
            except MemoryError:
                msg = msgpack.packb([False, "", "error: NVRTC ran out of memory"])
            os.write(w, struct.pack("<Q", len(msg)))
            view = memoryview(msg)
            while view:
                view = view[os.write(w, view):]
        except BaseException:   # noqa: BLE001  (the child must end here, whatever happened)
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        try:
            data = _read_all(r, deadline, pid)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise KernelCompileError("compile timed out (NVRTC)",
                                     "error: NVRTC timed out (the compile's time bound)") from None
    finally:
        os.close(r)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
    if len(data) < 8 or struct.unpack_from("<Q", data)[0] != len(data) - 8:
        why = (f"NVRTC ran out of its {memory_limit_bytes >> 20} MiB memory limit or was killed"
               if os.WIFSIGNALED(status) or len(data) < 8 else "NVRTC's answer was cut short")
        raise KernelCompileError(f"module does not compile ({why})", f"error: {why}")
    ok, ptx, log = msgpack.unpackb(data[8:])
    if log == _UNCONFINED:
        raise KernelCompileError(f"CUDA C source is not compiled here: {_UNCONFINED}", code=E.CUDA_ERROR_NOT_SUPPORTED)
    if not ok:
        first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[:200] or "NVRTC failed")
        raise KernelCompileError(f"module does not compile: {first}", log, code=E.CUDA_ERROR_INVALID_SOURCE)
    return ptx
