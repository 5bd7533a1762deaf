"""Building a module: the cache (a .so per content hash); CUDA C source through NVRTC to PTX
(nvrtc.py); PTX translated to C++ (kubecash.broker.ptx) and built by g++, each under time,
memory and file-size bounds; and the check of the built ELF object for code that would run at
load or unload time."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kubecash.client.errors import E

from .. import ptx  # imported here: the compile helper has no view of the package once confined
from . import nvrtc
from .directives import check_directives
from .elfcheck import check_load_time_code
from .errors import KernelCompileError, UnsupportedConstructError
from .loader import CompiledModule
from .options import parse_options
from .tokens import normalize_newlines

_INCLUDE_DIR = Path(__file__).resolve().parent.parent / "include"   # kubecash.broker's include/
_HEADER_PATHS = (_INCLUDE_DIR / "kubecash_runtime.h", _INCLUDE_DIR / "kubecash_ptx.h")
_MAX_COMPILER_FILE_BYTES = 256 << 20   # RLIMIT_FSIZE of the compiler: assembly, objects
_MAX_COMPILER_LOG_CHARS = 1 << 20      # compiler messages kept (a bomb can print a lot)


class _Stats:
    """Process-wide counters; tests use them to tell a cache hit from a compile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compiler_runs = 0   # g++ processes started
        self.compiles = 0        # modules built
        self.cache_hits = 0      # modules loaded from the cache without running a compiler

    def bump(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)


stats = _Stats()


def _compiler() -> str:
    cxx = os.environ.get("KUBECASH_CXX") or shutil.which("g++")
    if not cxx:
        raise KernelCompileError("no host C++ compiler (g++) found")
    return cxx


def _compiler_identity(cxx: str) -> str:
    # A stat, not a `g++ --version` run: a cache hit must not start any process.
    real = os.path.realpath(cxx)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}:{platform.machine()}"


def _run_compiler(argv: list[str], *, cwd: str, deadline: float, memory_limit_bytes: int,
                  what: str) -> str:
    file_limit = _MAX_COMPILER_FILE_BYTES
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise KernelCompileError(f"compile timed out ({what})")

    def limits() -> None:  # runs in the child, before exec
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        lim = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # No file it writes (preprocessed text, assembly, the object) may grow past this: a
        # macro expansion bomb ends with SIGXFSZ instead of filling the disk or our memory.
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    # A clean environment: no CPATH, DEPENDENCIES_OUTPUT and the like; plain-ASCII messages.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
           "TMPDIR": cwd}
    stats.bump("compiler_runs")
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=limits, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # cc1plus and as too, not just the driver
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        raise KernelCompileError(f"compile timed out ({what})",
                                 f"error: {what} timed out (the compile's time bound)\n"
                                 + err.decode("utf-8", "replace")[-_MAX_COMPILER_LOG_CHARS:]) from None
    log = err.decode("utf-8", "replace")[-_MAX_COMPILER_LOG_CHARS:]
    if p.returncode != 0:
        # The bound that stopped it goes first: it is what the tenant is told.
        if p.returncode == -signal.SIGXFSZ or "File size limit exceeded" in log:
            why = f"{what} output exceeds {file_limit >> 20} MiB: runaway macro or template expansion"
            raise KernelCompileError(f"module does not compile ({why})", f"error: {why}\n{log}")
        if p.returncode < 0 or "virtual memory exhausted" in log or "out of memory" in log:
            why = f"{what} ran out of its {memory_limit_bytes >> 20} MiB memory limit or was killed"
            raise KernelCompileError(f"module does not compile ({why})", f"error: {why}\n{log}")
        raise KernelCompileError(f"module does not compile ({what} failed)", log)
    return out.decode("utf-8", "replace")


# Per architecture. The fiber switch (kubecash_runtime.h) moves between stacks and leaves by
# an indirect jump: a module must not claim shadow-stack or branch-target compatibility
# (distributions' compilers turn both on by default), or a loader enforcing them would fault
# it. On arm64, gcc's default outline atomics link libgcc's CPU-feature constructor into the
# module: load-time code, which check_load_time_code refuses (inline LSE/LL-SC instead).
_ARCH_FLAGS = {"x86_64": ["-fcf-protection=none"],
               "aarch64": ["-mbranch-protection=none", "-mno-outline-atomics"]}


def _cxx_flags(machine: str | None = None) -> list[str]:
    """What modules are compiled with, for this machine (or `machine`: tests cross-build)."""
    return ["-O2", "-fPIC", "-pthread", "-fno-exceptions",
            "-fno-strict-aliasing",          # CUDA code casts float* to float4* and the like
            "-fno-gnu-unique",               # keep each loaded instance's statics its own
            "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # a trap longjmps off a fiber stack
            *_ARCH_FLAGS.get(machine or platform.machine(), []),
            "-fdiagnostics-color=never", "-fmax-errors=50", "-I", str(_INCLUDE_DIR)]


def link_argv(compiler: str, tu_path: str, out: str, *, std: str, flags: Sequence[str] = (),
              machine: str | None = None) -> list[str]:
    """The command that builds a module (a shared object) from C++ file `tu_path`."""
    return [compiler, f"-std={std}", "-shared", *_cxx_flags(machine), *flags,
            "-Wl,-Bsymbolic",                # the module's own symbols bind to itself
            "-Wl,-z,noexecstack", "-o", out, tu_path, "-ldl"]


def _link(tu: str, out_path: Path, *, std: str, work: str, deadline: float, memory_limit_bytes: int,
          flags: Sequence[str] = ()) -> None:
    """Compile translation unit `tu` into the module at `out_path`, checked for load-time code."""
    tu_path = os.path.join(work, "module.cc")
    with open(tu_path, "w") as f:
        f.write(tu)
    tmp_out = os.path.join(work, "module.so")
    argv = link_argv(_compiler(), tu_path, tmp_out, std=std, flags=flags)
    _run_compiler(argv, cwd=work, deadline=deadline, memory_limit_bytes=memory_limit_bytes,
                  what="compiler")
    check_load_time_code(tmp_out)
    os.replace(tmp_out, out_path)  # atomic: concurrent builders of one key never clash


def _host_fma_flags() -> list[str]:
    """PTX's fma (and the mul+add NVVM contracts into one) rounds once: without the CPU's
    fused multiply-add the host compiler calls libm's software fma. x86-64 has it only as an
    extension: use it where this CPU has it (a module is built on the node that runs it).
    Read at import, before the compile helper loses its view of /proc."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mfma"] if "fma" in flags else []


_PTX_FLAGS = _host_fma_flags()


def _translate_ptx(text: str, deadline: float) -> str:
    try:
        return ptx.to_cpp(text, deadline)
    except ptx.PtxUnsupportedError as e:
        raise UnsupportedConstructError(str(e)) from None
    except ptx.PtxTimeoutError as e:
        raise KernelCompileError("compile timed out (PTX translation)", f"error: {e}") from None
    except ptx.PtxError as e:
        raise KernelCompileError(f"PTX does not translate: {e}", code=E.CUDA_ERROR_INVALID_PTX) from None
    except RecursionError:
        raise KernelCompileError("PTX does not translate: nested too deeply", code=E.CUDA_ERROR_INVALID_PTX) from None
    except (ValueError, KeyError, IndexError, OverflowError) as e:   # a translator bug: still the tenant's answer
        raise KernelCompileError(f"PTX does not translate: {type(e).__name__}: {e}",
                                 code=E.CUDA_ERROR_INVALID_PTX) from None


def _translator_identity() -> str:
    """The translator's own source: a cached build depends on it like on the headers."""
    h = hashlib.sha256()
    for f in sorted(Path(ptx.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


_TRANSLATOR = _translator_identity()   # read at import, before the compile helper's view


_header_cache: dict[Path, tuple[int, str]] = {}


def _header_text(path: Path) -> str:
    """A header's text (part of the cache key), read again only when it changes."""
    st = os.stat(path)
    cached = _header_cache.get(path)
    if cached is None or cached[0] != st.st_mtime_ns:
        cached = _header_cache[path] = (st.st_mtime_ns, path.read_text())
    return cached[1]


def _checked(source, options: Sequence[str], language: str) -> tuple[str, list]:
    """The source as text, checked, and what its cache key is made of."""
    if isinstance(source, (bytes, bytearray)):
        try:
            source = bytes(source).decode("utf-8")
        except UnicodeDecodeError as e:
            raise KernelCompileError(f"module source is not UTF-8 text: {e}") from None
    if not isinstance(source, str):
        raise KernelCompileError("module source must be text")
    if "\0" in source:
        raise KernelCompileError("module source contains a NUL character")
    if language not in ("cuda-c", "ptx"):
        raise KernelCompileError(f"unknown module language {language!r}")
    source = normalize_newlines(source)
    key_parts: list = [language, source]
    if language == "cuda-c":
        # Checked before the cache is looked at, and without the compiler.
        opts = parse_options(options)
        check_directives(source, nvrtc.include_dirs(), digit_separators=opts.std not in ("c++03", "c++11"))
        key_parts += [opts.args, nvrtc.identity()]
    key_parts += [_TRANSLATOR, *(_header_text(p) for p in _HEADER_PATHS), _compiler_identity(_compiler()),
                  _cxx_flags(), _PTX_FLAGS]
    return source, key_parts


def _so_name(key_parts: list) -> str:
    return f"{hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()}.so"


def cache_path(cache_dir: os.PathLike, source: str, options: Sequence[str] = (), language: str = "cuda-c") -> Path:
    """Where the module built from this source and these options is cached."""
    return Path(cache_dir) / _so_name(_checked(source, options, language)[1])


def build_module(source: str, options: Sequence[str] = (), *, cache_dir: os.PathLike,
                 timeout_s: float = 60.0, memory_limit_bytes: int = 2 << 30,
                 language: str = "cuda-c") -> Path:
    """The built shared object for this source (CUDA C, or PTX text with language="ptx")
    and these options: from the cache, or built into it. (The compile helper runs this in
    its confined view.)"""
    deadline = time.monotonic() + timeout_s
    source, key_parts = _checked(source, options, language)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    so_path = cache / _so_name(key_parts)
    if so_path.exists():
        try:
            check_load_time_code(so_path)
            stats.bump("cache_hits")
            return so_path
        except (OSError, KernelCompileError):
            so_path.unlink(missing_ok=True)   # changed since it was built here: build it again
    work = tempfile.mkdtemp(prefix=".build-", dir=cache)
    try:
        ptx_text = source
        if language == "cuda-c":
            ptx_text = nvrtc.to_ptx(source, list(parse_options(options).args), deadline=deadline,
                                    memory_limit_bytes=memory_limit_bytes, cwd=work)
        # No tenant text reaches g++: the translation re-spells every name.
        _link(_translate_ptx(ptx_text, deadline), so_path, std="c++17", work=work, deadline=deadline,
              memory_limit_bytes=memory_limit_bytes, flags=_PTX_FLAGS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.bump("compiles")
    return so_path


def compile_module(source: str, options: Sequence[str] = (), *, cache_dir: os.PathLike,
                   timeout_s: float = 60.0, memory_limit_bytes: int = 2 << 30,
                   language: str = "cuda-c") -> CompiledModule:
    """Compile (or load from the cache) a module of CUDA C source (or PTX text) for the CPU
    backend, in this process (tests and tools; executors build in their compile helper, and
    NVRTC runs in a forked child: call this where no other thread holds a lock it needs)."""
    args = dict(cache_dir=cache_dir, timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes,
                language=language)
    so_path = build_module(source, options, **args)
    try:
        return CompiledModule._load(so_path, Path(cache_dir))
    except (OSError, KernelCompileError):
        so_path.unlink(missing_ok=True)   # unreadable or from another ABI: rebuild over it
        return CompiledModule._load(build_module(source, options, **args), Path(cache_dir))
