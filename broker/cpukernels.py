"""CUDA C kernels on the host: the CPU backend's compiler and launcher.

A module's CUDA C source becomes a shared object built by the host g++:

1. ``#include`` directives are checked on the raw source (the compiler must never read a
   host file for a tenant); the few headers our own ``kubecash_cuda.h`` provides are
   removed, anything else is refused.
2. ``g++ -E`` with the header in *scan mode* (CUDA keywords left as identifiers) expands
   the tenant's macros and conditionals, so what is checked next is what gets compiled.
3. The expanded tenant text is tokenized: refused constructs raise
   :class:`UnsupportedConstructError`; kernels, ``__device__``/``__constant__`` variables
   and ``extern __shared__`` arrays are found; generated code (tables and ``extern "C"``
   entry points, see part 2 of the header) is appended.
4. ``g++ -O2 -shared -fPIC`` builds it; the .so is cached by content hash and loaded
   privately (a fresh copy per load, so two loads never share ``__device__`` globals).

:class:`Launcher` runs a kernel's blocks on N persistent native worker threads
(:mod:`kubecash.broker.sandbox`: each confined by a seccomp filter before it runs tenant
code).  Each worker calls the module's ``__kc_run``, grabbing block indices from one shared
atomic counter.  A block's threads run as a plain loop, or, in
modules that use ``__syncthreads``, as fibers switched with ``_setjmp``/``_longjmp``.
"""
from __future__ import annotations

import _ctypes  # dlopen/dlsym/dlclose without a ctypes.CDLL (see _ModuleApi)
import bisect
import ctypes
import dataclasses
import hashlib
import itertools
import json
import mmap
import os
import platform
import re
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import sandbox as _sandbox
from .sandbox import array_type

__all__ = [
    "KernelCompileError", "UnsupportedConstructError", "compile_module", "CompiledModule",
    "KernelInfo", "Launcher", "stats", "MAX_SHARED_BYTES",
]

# Bump whenever the generated code or its contract with the header changes: part of the
# cache key, so stale .so files are never reused.
_GENERATOR_VERSION = "kubecash-cpukernels-4"
_ABI_VERSION = 1  # must equal __KC_ABI in kubecash_cuda.h
_INCLUDE_DIR = Path(__file__).resolve().parent / "include"
_HEADER_PATH = _INCLUDE_DIR / "kubecash_cuda.h"
_TENANT_FILE = "kernel.cu"  # the name compiler messages give the tenant's source
_SENTINEL = "__kc_tenant_source_begins_here__"

MAX_SHARED_BYTES = 48 * 1024
_MAX_BLOCK_THREADS = 1024
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)
_DEFAULT_CUDA_ARCH = 700
_MAX_COMPILER_FILE_BYTES = 256 << 20   # RLIMIT_FSIZE of the compiler: preprocessed text, objects
_MAX_PREPROCESSED_BYTES = 64 << 20    # the expanded source we go on to analyse and compile
_MAX_COMPILER_LOG_CHARS = 1 << 20      # compiler messages kept (a bomb can print a lot)

# Headers kubecash_cuda.h already stands in for: an #include of one of these is dropped.
_INCLUDE_WHITELIST = frozenset({
    "cuda_runtime.h", "cuda.h", "cuda_runtime_api.h", "device_launch_parameters.h",
    "stdint.h", "cstdint", "math.h", "cmath", "stddef.h", "cstddef", "float.h", "cfloat",
    "limits.h", "climits", "stdio.h", "cstdio",
})


class KernelCompileError(Exception):
    """The module does not compile, or is refused."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log or message


class UnsupportedConstructError(KernelCompileError):
    """The module uses something the CPU backend cannot run correctly."""

    def __init__(self, construct: str, reason: str = ""):
        msg = f"unsupported on the CPU backend: {construct}" + (f" ({reason})" if reason else "")
        super().__init__(msg, msg)
        self.construct = construct


class _Stats:
    """Process-wide counters; tests use them to tell a cache hit from a compile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compiler_runs = 0   # g++ processes started (preprocess and compile)
        self.compiles = 0        # modules built
        self.cache_hits = 0      # modules loaded from the cache without running g++

    def bump(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)


stats = _Stats()


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------

_STD_MAP = {  # the header needs C++17; gnu++ dialects have no trigraphs
    "c++03": "gnu++17", "c++11": "gnu++17", "c++14": "gnu++17", "c++17": "gnu++17",
    "c++20": "gnu++20",
}
_MACRO_NAME = re.compile(r"[A-Za-z_]\w*(?:\([\w\s,.]*\))?\Z")
_IGNORED_OPTIONS = re.compile(
    r"(?:-lineinfo|--generate-line-info|-G|--device-debug|-?-use_fast_math|-default-device"
    r"|-rdc=false|--relocatable-device-code=false)\Z")
_ARCH_OPTION = re.compile(r"(?:-arch|--gpu-architecture)(?:[=\s]+|\Z)(.*)", re.S)


@dataclasses.dataclass(frozen=True)
class _Options:
    std: str
    defines: tuple[str, ...]   # "NAME" or "NAME=VALUE", for the preprocessing run
    arch: int


def _parse_options(options: Sequence[str]) -> _Options:
    if isinstance(options, (str, bytes)):
        raise KernelCompileError("options must be a sequence of strings, not one string")
    std, defines, arch = "gnu++17", [], _DEFAULT_CUDA_ARCH
    opts = list(options)
    i = 0
    while i < len(opts):
        o = opts[i]
        if not isinstance(o, str):
            raise KernelCompileError(f"compile option {o!r} is not a string")
        if "\n" in o or "\r" in o or "\0" in o:
            raise KernelCompileError(f"compile option {o!r} contains a line break or NUL")
        i += 1
        if o in ("-D", "--define-macro"):
            if i >= len(opts) or not isinstance(opts[i], str):
                raise KernelCompileError(f"compile option {o} needs a macro")
            o, i = "-D" + opts[i], i + 1
            if "\n" in o or "\r" in o or "\0" in o:
                raise KernelCompileError(f"compile option {o!r} contains a line break or NUL")
        elif o.startswith("--define-macro="):
            o = "-D" + o[len("--define-macro="):]
        if o.startswith("-D"):
            d = o[2:].lstrip()
            name, _, _value = d.partition("=")
            if not _MACRO_NAME.match(name):
                raise KernelCompileError(f"compile option {o!r}: not a macro name")
            defines.append(d)
        elif o.startswith(("-std=", "--std=")):
            v = o.split("=", 1)[1]
            if v not in _STD_MAP:
                raise KernelCompileError(f"compile option {o!r}: unsupported C++ standard "
                                         f"(accepted: {', '.join(sorted(_STD_MAP))})")
            std = _STD_MAP[v]
        elif (m := _ARCH_OPTION.match(o)):
            v = m.group(1)
            if not v and o in ("-arch", "--gpu-architecture") and i < len(opts):
                v, i = str(opts[i]), i + 1
            # sm_80 / compute_80 set __CUDA_ARCH__ = 800; anything else keeps the default.
            am = re.fullmatch(r"(?:sm|compute|lto)_(\d+)[af]?", v)
            if am:
                arch = int(am.group(1)) * 10
        elif _IGNORED_OPTIONS.match(o):
            pass
        else:
            raise KernelCompileError(f"compile option {o!r} is not accepted by the CPU backend")
    return _Options(std, tuple(defines), arch)


# ----------------------------------------------------------------------------------------
# Tokenizer (good enough for preprocessing-token boundaries, comments and literals)
# ----------------------------------------------------------------------------------------

_TOKEN_BODY = r"""
  | (?P<ws>[ \t\r\f\v]+|\n)
  | (?P<lc>//[^\n]*)
  | (?P<bc>/\*.*?\*/)
  | (?P<ubc>/\*.*)
  | (?P<raw>(?:u8|[uUL])?R")
  | (?P<str>(?:u8|[uUL])?"(?:\\.|[^"\\\n])*"?)
  | (?P<chr>(?:u8|[uUL])?'(?:\\.|[^'\\\n])*'?)
  | (?P<num>\.?[0-9](?:[eEpP][+-]|'(?=[0-9A-Za-z_])|[0-9A-Za-z_.])*)
  | (?P<id>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<op>%:%:|%:|<:(?!:(?![:>]))|:>|<%|%>|\.\.\.|->\*?|::|<<=|>>=|<<|>>|<=|>=|==|!=
          |&&|\|\||\+\+|--|[-+*/%&|^!=]=|\#\#|.)
"""
# Raw source: no directive lines to skip (they are what we look for).
_RAW_TOKEN_RE = re.compile(r"(?P<nothing>(?!))" + _TOKEN_BODY, re.S | re.X)
# Preprocessed output: a line starting with '#' is a linemarker or #pragma.
_PP_TOKEN_RE = re.compile(r"(?P<pp>(?m:^)[ \t\f\v]*(?:\#|%:)[^\n]*)" + _TOKEN_BODY, re.S | re.X)
_DIGRAPHS = {"<%": "{", "%>": "}", "<:": "[", ":>": "]", "%:": "#", "%:%:": "##"}


def _splice(src: str) -> tuple[str, list[int], list[int]]:
    """Phase 2 line splicing.  Returns the spliced text and, for mapping positions back,
    the spliced positions of the splices and the total removed length up to each."""
    parts, pos_at, removed_at = [], [], []
    last, removed, out_len = 0, 0, 0
    # GCC accepts whitespace between the backslash and the newline (with a warning).
    for m in re.finditer(r"\\[ \t\f\v]*\r?\n", src):
        parts.append(src[last:m.start()])
        out_len += m.start() - last
        removed += m.end() - m.start()
        pos_at.append(out_len)
        removed_at.append(removed)
        last = m.end()
    parts.append(src[last:])
    return "".join(parts), pos_at, removed_at


def _to_orig(i: int, pos_at: list[int], removed_at: list[int]) -> int:
    k = bisect.bisect_right(pos_at, i)
    return i + (removed_at[k - 1] if k else 0)


# ----------------------------------------------------------------------------------------
# Step 1: directives on the raw source
# ----------------------------------------------------------------------------------------

_DIRECTIVE_RE = re.compile(r"[ \t\f\v\r]*(?P<hash>#|%:)[ \t\f\v\r]*([A-Za-z_]\w*)?(.*)", re.S)
_INCLUDE_KWS = ("include", "include_next", "import", "embed")


def _normalize_newlines(text: str) -> str:
    """GCC ends a line at \n, \r\n and a lone \r alike; the checks split on \n only, so
    the text they check and the text compiled must agree on where lines end."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _sanitize_directives(source: str) -> str:
    """Refuse every #include-like directive except the whitelist, which is blanked out
    (line numbers kept).  Works on the logical lines the compiler sees: after line
    splicing, with comments replaced by spaces."""
    spliced, pos_at, removed_at = _splice(source)
    clean = []  # same length as `spliced`, comments blanked
    for m in _RAW_TOKEN_RE.finditer(spliced):
        kind, text = m.lastgroup, m.group()
        if kind in ("lc", "bc", "ubc"):
            clean.append(re.sub(r"[^\n]", " ", text) if kind == "lc" else " " * len(text))
        elif kind == "raw":
            # The start of a raw string (matched alone: scanning for its end could take
            # quadratic time).  A raw string spans lines, and whether `xR"(` starts one
            # depends on identifier rules (non-ASCII letters...) where we could disagree
            # with g++ and so miss a directive it sees.  Kernels do not need them: refuse.
            raise UnsupportedConstructError("raw string literal")
        else:
            clean.append(text)
    code = "".join(clean)
    assert len(code) == len(spliced)

    if re.search(r"\b__has_include(?:_next)?\b", code):
        raise UnsupportedConstructError("__has_include", "it probes host files")
    if re.search(r"\bGCC\W{0,8}dependency\b", code):
        raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")

    out = list(source)
    line_start = 0
    for line in code.split("\n"):
        m = _DIRECTIVE_RE.match(line)
        if m and m.group(2) in _INCLUDE_KWS:
            kw, operand = m.group(2), m.group(3).strip()
            name = None
            om = re.fullmatch(r'<([^<>"\n]*)>|"([^"\n]*)"', operand)
            if om:
                name = om.group(1) if om.group(1) is not None else om.group(2)
            if not om:
                if operand and not operand.startswith(("<", '"')):
                    raise UnsupportedConstructError(f"#{kw} {operand}",
                                                    "a macro-expanded include is not allowed")
                raise UnsupportedConstructError(f"#{kw} {operand}".rstrip())
            if kw != "include" or name not in _INCLUDE_WHITELIST:
                raise UnsupportedConstructError(f"#{kw} {operand}",
                                                "only headers the CPU backend provides may be included")
            # Whitelisted: blank it in the original text, keeping every newline.
            hash_pos = line_start + m.start("hash")
            a = _to_orig(hash_pos, pos_at, removed_at)
            b = _to_orig(line_start + len(line) - 1, pos_at, removed_at) + 1
            for j in range(a, min(b, len(out))):
                if out[j] != "\n":
                    out[j] = " "
        elif m and m.group(2) == "pragma" and re.search(r"\bdependency\b", m.group(3)):
            raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")
        line_start += len(line) + 1
    return "".join(out)


# ----------------------------------------------------------------------------------------
# Step 3: analysis of the preprocessed tenant text
# ----------------------------------------------------------------------------------------

_REFUSED_IDS = re.compile(r"""(?x)
    (?P<warp>__shfl\w*|__ballot\w*|__any_sync|__all_sync|__uni_sync|__any|__all|__activemask
            |__syncwarp|__match_\w+|__reduce_\w+_sync)
  | (?P<sleep>__nanosleep)
  | (?P<cg>cooperative_groups)
  | (?P<asm>asm|__asm__|__asm)
  | (?P<tex>tex(?:1D|2D|3D|Cubemap|CubeMap)\w*|surf(?:1D|2D|3D|Cubemap|CubeMap)\w*
           |cudaTextureObject_t|cudaSurfaceObject_t)
  | (?P<probe>__has_include|__has_include_next)
""")
_REFUSED_WHY = {
    "warp": "warp-level intrinsics need threads running in lockstep",
    "sleep": "spin-waiting on other threads cannot progress here",
    "cg": "cooperative groups are not available",
    "asm": "inline PTX assembly cannot run on the host",
    "tex": "textures and surfaces are not available",
    "probe": "it probes host files",
}
_LOAD_TIME_ATTRS = frozenset({"constructor", "destructor", "section", "ifunc", "init_priority"})
_BARRIERS = frozenset({"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                       "__syncthreads_or"})
_PAREN_ATTRS = frozenset({"__launch_bounds__", "__attribute__", "__align__", "alignas",
                          "__declspec", "__maxnreg__", "decltype", "__builtin_align__"})
_VAR_QUALS = frozenset({"__device__", "__constant__", "__managed__"})
_KEYWORDS = frozenset("""
    alignas alignof asm auto bool break case catch char char16_t char32_t char8_t class const
    constexpr const_cast continue decltype default delete do double dynamic_cast else enum
    explicit export extern false float for friend goto if inline int long mutable namespace new
    noexcept nullptr operator private protected public register reinterpret_cast return short
    signed sizeof static static_assert static_cast struct switch template this thread_local
    throw true try typedef typeid typename union unsigned using virtual void volatile wchar_t
    while __restrict__ __restrict __shared__ __device__ __constant__ __managed__ __global__
    __host__ __forceinline__ __noinline__""".split())


@dataclasses.dataclass
class _Analysis:
    kernels: list[tuple[str, str]]            # (plain name, qualified name)
    variables: list[tuple[str, str]]
    extern_shared_globals: list[str]          # qualified names of namespace-scope ones
    fibers: bool
    text: str                                 # tenant text, rewritten


class _Tokens:
    def __init__(self, text: str):
        self.kind: list[str] = []
        self.text: list[str] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.pp_lines: list[tuple[int, int]] = []
        for m in _PP_TOKEN_RE.finditer(text):
            k = m.lastgroup
            if k in ("ws", "lc", "bc", "ubc"):
                continue
            if k == "pp":
                self.pp_lines.append((m.start(), m.end()))
                continue
            t = m.group()
            if k == "op":
                t = _DIGRAPHS.get(t, t)
            self.kind.append(k)
            self.text.append(t)
            self.start.append(m.start())
            self.end.append(m.end())
        self.n = len(self.text)

    def match(self, i: int) -> int:
        """Index of the bracket closing the one at i (or n-1)."""
        pairs = {"(": ")", "[": "]", "{": "}"}
        open_, close = self.text[i], pairs[self.text[i]]
        depth = 0
        for j in range(i, self.n):
            t = self.text[j]
            if t == open_:
                depth += 1
            elif t == close:
                depth -= 1
                if depth == 0:
                    return j
        return self.n - 1


def _analyze(text: str) -> _Analysis:
    text = _normalize_newlines(text)
    tk = _Tokens(text)
    T, K = tk.text, tk.kind
    edits: list[tuple[int, int, str]] = []

    # -- lines that would become directives when this text is compiled -------------------
    for a, b in tk.pp_lines:
        line = text[a:b]
        mm = re.fullmatch(r'[ \t\f\v]*#[ \t]*(\d+)[ \t]+("(?:[^"\\]|\\.)*")(?:[ \t]+\d+)*[ \t]*', line)
        if mm:  # linemarker: keep the line numbers, drop the include-stack flags
            edits.append((a, b, f"#line {mm.group(1)} {mm.group(2)}"))
        elif re.match(r"[ \t\f\v]*(?:#|%:)[ \t\f\v]*pragma\b", line):
            if re.search(r"\bdependency\b", line):
                raise UnsupportedConstructError("#pragma GCC dependency", "it reads host files")
        else:
            # Macro expansion produced a '#' at the start of a line: compiling this text
            # would turn it into a directive.
            raise UnsupportedConstructError("macro expanding to a preprocessor directive",
                                            line.strip()[:80])
    for line in text.split("\n"):
        if line.rstrip().endswith("\\"):
            raise UnsupportedConstructError("stray backslash at the end of a line")

    # -- refused constructs -------------------------------------------------------------
    ids = set()
    for i in range(tk.n):
        t = T[i]
        if K[i] == "id":
            ids.add(t)
            m = _REFUSED_IDS.fullmatch(t)
            if m:
                raise UnsupportedConstructError(t, _REFUSED_WHY[m.lastgroup])
            if t in ("texture", "surface") and i + 1 < tk.n and T[i + 1] == "<":
                raise UnsupportedConstructError(f"{t}<...>", _REFUSED_WHY["tex"])
        elif t == "<<" and i + 1 < tk.n and T[i + 1] == "<" and tk.start[i + 1] == tk.end[i]:
            raise UnsupportedConstructError("<<<...>>> kernel launch in device code",
                                            "dynamic parallelism is not available")
    if "volatile" in ids and "__shared__" in ids:
        # Warp-synchronous reductions through volatile shared memory assume 32 threads in
        # lockstep; run one after another they compute a wrong result.
        raise UnsupportedConstructError("volatile with __shared__ (warp-synchronous code)",
                                        "threads of a warp do not run in lockstep here")
    fibers = bool(ids & _BARRIERS)
    # Code that would run when the module is loaded or unloaded runs outside the sandbox
    # (on the executor's own threads): refuse the attributes that put it there. Dynamic
    # initializers are caught in the built object (_check_load_time_code).
    for i in range(tk.n):
        if T[i] in ("__attribute__", "__attribute") and i + 1 < tk.n and T[i + 1] == "(":
            end = tk.match(i + 1)
        elif T[i] == "[" and i + 1 < tk.n and T[i + 1] == "[":
            end = tk.match(i)
        else:
            continue
        for j in range(i + 1, end):
            if K[j] == "id" and T[j].strip("_") in _LOAD_TIME_ATTRS:
                raise UnsupportedConstructError(f"attribute {T[j].strip('_')}",
                                                "code that runs at load or unload time, or in a "
                                                "chosen section, is not allowed")

    kernels: list[tuple[str, str]] = []
    kernel_seen: set[str] = set()
    variables: list[tuple[str, str]] = []
    var_seen: set[str] = set()
    extern_globals: list[str] = []
    stack: list[tuple[str, str]] = []   # ("ns", name) | ("link", "") | ("other", "")
    var_done_upto = -1

    def scope_ok() -> bool:
        return all(k != "other" for k, _ in stack)

    def scope_path() -> str:
        return "::".join(name for k, name in stack if k == "ns" and name)

    def qualify(name: str) -> str:
        p = scope_path()
        return f"{p}::{name}" if p else name

    def decl_start(i: int) -> int:
        j = i - 1
        while j >= 0 and T[j] not in (";", "{", "}"):
            j -= 1
        return j + 1

    def classify_brace(i: int) -> tuple[str, str]:
        j, parts = i - 1, []
        while j >= 0 and (K[j] == "id" or T[j] == "::") and T[j] not in ("namespace", "inline"):
            parts.append(T[j])
            j -= 1
        if j >= 0 and T[j] == "namespace":
            return ("ns", "".join(reversed(parts)))
        if i >= 2 and K[i - 1] == "str" and T[i - 2] == "extern":
            return ("link", "")
        return ("other", "")

    def skip_attr(j: int) -> int:
        """j at an attribute-ish token; returns the index after it, or j if none."""
        if K[j] == "id" and T[j] in _PAREN_ATTRS and j + 1 < tk.n and T[j + 1] == "(":
            return tk.match(j + 1) + 1
        if T[j] == "[" and j + 1 < tk.n and T[j + 1] == "[":
            return tk.match(j) + 1
        return j

    def handle_kernel(i: int) -> None:
        if not scope_ok():
            raise UnsupportedConstructError("__global__ function inside a class or function")
        for j in range(decl_start(i), i):
            if T[j] == "template":
                raise UnsupportedConstructError("template __global__ kernel",
                                                "instantiate it as a plain extern \"C\" kernel")
        j = i + 1
        while j < tk.n:
            nj = skip_attr(j)
            if nj != j:
                j = nj
                continue
            if T[j] == "(":
                break
            if T[j] in (";", "{", "}", "="):
                return
            j += 1
        if j >= tk.n or K[j - 1] != "id" or T[j - 1] in _KEYWORDS:
            return  # not a function declarator we understand; the compiler will judge
        name, q = T[j - 1], j - 2
        quals = []
        while q >= 1 and T[q] == "::" and K[q - 1] == "id":
            quals.insert(0, T[q - 1])
            q -= 2
        # Definition or declaration?
        m = tk.match(j) + 1
        while m < tk.n and T[m] not in ("{", ";"):
            m = tk.match(m) + 1 if T[m] in ("(", "[") else m + 1
        if m >= tk.n or T[m] != "{":
            return  # a declaration: the definition (if any) registers it
        qual = qualify("::".join(quals + [name]))
        if qual in kernel_seen:
            raise UnsupportedConstructError(f"overloaded __global__ kernel {name}")
        kernel_seen.add(qual)
        kernels.append((name, qual))

    def handle_var(i: int) -> None:
        nonlocal var_done_upto
        if i <= var_done_upto or not scope_ok():
            return
        start = decl_start(i)
        if any(T[j] in ("extern", "template", "typedef", "friend", "using") for j in range(start, i)):
            return
        j, angle = i + 1, 0
        while j < tk.n:
            nj = skip_attr(j)
            if nj != j:
                j = nj
                continue
            t = T[j]
            if t == "(":
                var_done_upto = j  # a function (or something we do not register)
                return
            if t in ("extern", "template", "typedef"):
                var_done_upto = j
                return
            if t == "<":
                angle += 1
            elif t == ">":
                angle -= 1
            elif t == ">>":
                angle -= 2
            elif angle <= 0 and t in ("[", "=", ";", ",", "{"):
                break
            elif t == "}":
                return
            j += 1
        if j >= tk.n:
            return
        if T[j] == "{" and any(T[k] in ("struct", "class", "union", "enum") for k in range(i, j)):
            var_done_upto = j
            return
        # Declarators: name [dims] [= init | {init}] (, ...)* ;
        while True:
            if K[j - 1] != "id" or T[j - 1] in _KEYWORDS:
                var_done_upto = j
                return
            qual = qualify(T[j - 1])
            if qual not in var_seen:
                var_seen.add(qual)
                variables.append((T[j - 1], qual))
            while j < tk.n and T[j] == "[":
                j = tk.match(j) + 1
            if j < tk.n and T[j] == "=":
                j += 1
                while j < tk.n and T[j] not in (",", ";"):
                    j = tk.match(j) + 1 if T[j] in ("(", "[", "{") else j + 1
            elif j < tk.n and T[j] == "{":
                j = tk.match(j) + 1
            if j < tk.n and T[j] == ",":
                j += 1
                while j < tk.n and not (K[j] == "id" and T[j] not in _KEYWORDS
                                        and j + 1 < tk.n and T[j + 1] in ("[", "=", ";", ",", "{")):
                    if T[j] in (";", "{", "}", "("):
                        var_done_upto = j
                        return
                    j += 1
                j += 1
                continue
            var_done_upto = j
            return

    def handle_extern(i: int) -> None:
        if i + 1 < tk.n and K[i + 1] == "str":
            return  # extern "C"
        j, has_shared = i + 1, False
        while j < tk.n and T[j] not in (";", "{", "}"):
            if T[j] == "__shared__":
                has_shared = True
            j = tk.match(j) + 1 if T[j] == "(" else j + 1
        if not has_shared:
            return
        if not (j < tk.n and T[j] == ";" and T[j - 1] == "]" and T[j - 2] == "["
                and K[j - 3] == "id"):
            raise UnsupportedConstructError("extern __shared__ declaration of this form",
                                            "write: extern __shared__ T name[];")
        name, ty, k = T[j - 3], [], i + 1
        while k < j - 3:
            nk = skip_attr(k)
            if nk != k:
                k = nk
                continue
            if T[k] not in ("__shared__", "static", "extern", ","):
                ty.append(T[k])
            if T[k] == ",":
                raise UnsupportedConstructError("extern __shared__ declaration of this form",
                                                "declare one array per statement")
            k += 1
        if not ty:
            raise UnsupportedConstructError("extern __shared__ declaration without a type")
        tys = " ".join(ty)
        if scope_ok():
            # Namespace scope: a per-thread pointer the block loop sets at every launch.
            repl = f"static thread_local {tys}* {name};"
            extern_globals.append(qualify(name))
        else:
            repl = f"{tys}* const {name} = ({tys}*)(::__kc::dyn_shared);"
        a, b = tk.start[i], tk.end[j]
        edits.append((a, b, repl + "\n" * text.count("\n", a, b)))

    for i in range(tk.n):
        t = T[i]
        if t == "{":
            stack.append(classify_brace(i))
        elif t == "}":
            if stack:
                stack.pop()
        elif t == "__global__":
            handle_kernel(i)
        elif t in _VAR_QUALS:
            handle_var(i)
        elif t == "extern":
            handle_extern(i)

    out, last = [], 0
    for a, b, r in sorted(edits):
        out.append(text[last:a])
        out.append(r)
        last = b
    out.append(text[last:])
    return _Analysis(kernels, variables, extern_globals, fibers, "".join(out))


def _generate(an: _Analysis) -> str:
    """Code appended after the tenant text: the runtime and the tables it exports."""
    g = ['#line 1 "<kubecash-generated>"',
         f"#define __KC_FIBERS {1 if an.fibers else 0}",
         "#define __KC_RUNTIME__ 1",
         '#include "kubecash_cuda.h"',
         "namespace __kc { static void extern_shared_hook(void* p) {"]
    g += [f"    ::{q} = static_cast<decltype(::{q})>(p);" for q in an.extern_shared_globals]
    g.append("    (void)p; } }")
    g.append("static const ::__kc::KernelEntry __kc_kernel_table[] = {")
    g += [f'    __KC_KERNEL("{n}", "{q}", ::{q})' for n, q in an.kernels]
    g.append("    { nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr } };")
    g.append("static const ::__kc::VarEntry __kc_var_table[] = {")
    g += [f'    __KC_VAR("{n}", "{q}", ::{q})' for n, q in an.variables]
    g.append("    { nullptr, nullptr, nullptr, 0 } };")
    g.append("__KC_EXPORTS")
    return "\n".join(g) + "\n"


# ----------------------------------------------------------------------------------------
# Running the compiler
# ----------------------------------------------------------------------------------------

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
                  what: str, file_limit_bytes: int = 0) -> str:
    file_limit = file_limit_bytes or _MAX_COMPILER_FILE_BYTES
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


def _cxx_flags() -> list[str]:
    return ["-O2", "-fPIC", "-pthread", "-fno-exceptions",
            "-fno-strict-aliasing",          # CUDA code casts float* to float4* and the like
            "-fno-gnu-unique",               # keep each loaded instance's statics its own
            "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",  # longjmp between stacks
            "-fdiagnostics-color=never", "-fmax-errors=50", "-I", str(_INCLUDE_DIR)]


def _build(source: str, opts: _Options, out_path: Path, *, work: str, deadline: float,
           memory_limit_bytes: int) -> None:
    cxx = _compiler()
    scan_path = os.path.join(work, "scan.cc")
    with open(scan_path, "w") as f:
        f.write('#include "kubecash_cuda.h"\n'
                f"{_SENTINEL}\n"
                f'#line 1 "{_TENANT_FILE}"\n' + source + "\n")
    argv = [cxx, f"-std={opts.std}", "-E", "-D__KC_SCAN__=1", f"-D__CUDA_ARCH__={opts.arch}"]
    argv += [f"-D{d}" for d in opts.defines]
    pp_path = os.path.join(work, "scan.ii")
    argv += ["-fdiagnostics-color=never", "-fmax-errors=50", "-I", str(_INCLUDE_DIR), "-o", pp_path,
             scan_path]
    _run_compiler(argv, cwd=work, deadline=deadline, memory_limit_bytes=memory_limit_bytes,
                  what="preprocessor", file_limit_bytes=_MAX_PREPROCESSED_BYTES)
    with open(pp_path, encoding="utf-8", errors="replace") as f:   # at most the file cap
        pp = f.read()
    m = re.search(rf"^{_SENTINEL}[ \t]*$", pp, re.M)
    if not m:
        raise KernelCompileError("internal error: tenant source not found after preprocessing", pp[-2000:])
    tenant = pp[m.end() + 1:]
    an = _analyze(tenant)
    tu_path = os.path.join(work, "module.cc")
    with open(tu_path, "w") as f:
        f.write('#include "kubecash_cuda.h"\n' + an.text + "\n" + _generate(an))
    tmp_out = os.path.join(work, "module.so")
    argv = [cxx, f"-std={opts.std}", "-shared", *_cxx_flags(),
            "-Wl,-Bsymbolic",                # the module's own symbols bind to itself
            "-Wl,-z,noexecstack", "-o", tmp_out, tu_path, "-ldl"]
    _run_compiler(argv, cwd=work, deadline=deadline, memory_limit_bytes=memory_limit_bytes,
                  what="compiler")
    _check_load_time_code(tmp_out)
    os.replace(tmp_out, out_path)  # atomic: concurrent builders of one key never clash


_DT_INIT_ARRAYSZ, _DT_FINI_ARRAYSZ, _DT_PREINIT_ARRAYSZ = 27, 28, 33


def _check_load_time_code(path: str) -> None:
    """Refuse a module with initializers or finalizers of its own: dlopen/dlclose would run
    them on the executor's unconfined threads. A module built here has exactly one entry
    in each of .init_array and .fini_array (crtbegin's frame_dummy and
    __do_global_dtors_aux); a namespace-scope object with a dynamic initializer or a
    destructor adds one. (CUDA has no dynamic initialization of device variables.)"""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KernelCompileError("internal error: the module is not a 64-bit little-endian ELF object")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    sizes = {}
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 2:   # PT_DYNAMIC
            continue
        for off in range(p_offset, p_offset + p_filesz, 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            sizes[tag] = val
    if (sizes.get(_DT_INIT_ARRAYSZ, 0) > 8 or sizes.get(_DT_FINI_ARRAYSZ, 0) > 8
            or sizes.get(_DT_PREINIT_ARRAYSZ, 0)):
        raise UnsupportedConstructError(
            "code that runs when the module is loaded or unloaded",
            "a namespace-scope variable with a dynamic initializer or a destructor; "
            "initialize globals, __device__ and __constant__ variables with constants")


_header_cache: tuple[float, str] | None = None


def _header_text() -> str:
    global _header_cache
    st = os.stat(_HEADER_PATH)
    if _header_cache is None or _header_cache[0] != st.st_mtime_ns:
        _header_cache = (st.st_mtime_ns, _HEADER_PATH.read_text())
    return _header_cache[1]


def compile_module(source: str, options: Sequence[str] = (), *, cache_dir: os.PathLike,
                   timeout_s: float = 60.0, memory_limit_bytes: int = 2 << 30) -> CompiledModule:
    """Compile (or load from the cache) a module of CUDA C source for the CPU backend."""
    deadline = time.monotonic() + timeout_s
    if isinstance(source, (bytes, bytearray)):
        try:
            source = bytes(source).decode("utf-8")
        except UnicodeDecodeError as e:
            raise KernelCompileError(f"module source is not UTF-8 text: {e}") from None
    if not isinstance(source, str):
        raise KernelCompileError("module source must be text")
    if "\0" in source:
        raise KernelCompileError("module source contains a NUL character")
    opts = _parse_options(options)
    sanitized = _sanitize_directives(_normalize_newlines(source))  # never needs the compiler

    cxx = _compiler()
    key = hashlib.sha256(json.dumps(
        [_GENERATOR_VERSION, _header_text(), _compiler_identity(cxx), source,
         dataclasses.asdict(opts)]).encode()).hexdigest()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    so_path = cache / f"{key}.so"
    if so_path.exists():
        try:
            mod = CompiledModule._load(so_path, cache)
            stats.bump("cache_hits")
            return mod
        except (OSError, KernelCompileError):
            pass  # unreadable or from another ABI: rebuild over it
    work = tempfile.mkdtemp(prefix=".build-", dir=cache)
    try:
        _build(sanitized, opts, so_path, work=work, deadline=deadline,
               memory_limit_bytes=memory_limit_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.bump("compiles")
    return CompiledModule._load(so_path, cache)


# ----------------------------------------------------------------------------------------
# Loaded modules
# ----------------------------------------------------------------------------------------

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
        self = object.__new__(cls)
        # dlopen returns the already-loaded object for a path (or inode) it has seen, and
        # every instance must own its __device__ globals: load a private copy each time.
        fd, tmp = tempfile.mkstemp(prefix=".load-", suffix=".so", dir=cache)
        try:
            with os.fdopen(fd, "wb") as dst, open(so_path, "rb") as src:
                shutil.copyfileobj(src, dst)
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


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------

class _KcLaunch(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3),
                ("nblocks", ctypes.c_uint64), ("next_block", ctypes.c_void_p),
                ("shared_bytes", ctypes.c_uint64), ("module_id", ctypes.c_uint64)]


class _KcWorker(ctypes.Structure):
    _fields_ = [("shared", ctypes.c_void_p), ("stacks", ctypes.c_void_p),
                ("slot_size", ctypes.c_uint64), ("guard_size", ctypes.c_uint64),
                ("nslots", ctypes.c_uint64), ("nfibers", ctypes.c_uint64),
                ("owner_module", ctypes.c_uint64), ("owner_thread", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)   # the process's own libc; no find_library run
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE


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

    def ensure_stacks(self, need: int) -> None:
        if self.c.nslots >= need:
            return
        n = min(_MAX_BLOCK_THREADS, max(32, 1 << (need - 1).bit_length()))
        self.free_stacks()
        length = n * self.slot_size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise MemoryError(f"cannot map {length} bytes of fiber stacks: "
                              f"{os.strerror(ctypes.get_errno())}")
        self.stacks, self.map_len = addr, length
        for i in range(n):  # a guard page under each stack turns overflow into a fault
            if _libc.mprotect(addr + i * self.slot_size, _PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of a fiber guard page failed")
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
    for x, lim, axis in zip(t, limits, "xyz"):
        if not 1 <= x <= lim:
            raise ValueError(f"{what}.{axis} = {x} is out of range (1..{lim})")
    return t  # type: ignore[return-value]


class Launcher:
    """A persistent pool of worker threads that run kernels' blocks."""

    def __init__(self, nthreads: int, *, fiber_stack_bytes: int = 64 << 10, nice: int = 0,
                 sandbox: bool = True, cache_dir: os.PathLike | str | None = None):
        """nthreads native worker threads (kubecash.broker.sandbox.Pool). With `sandbox`
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
        self._pool = _sandbox.Pool([ctypes.addressof(w.c) for w in self._workers], nice=nice,
                                   sandbox=sandbox, cache_dir=cache_dir)
        self.sandboxed = sandbox

    @property
    def nthreads(self) -> int:
        return len(self._workers)

    def launch(self, module: CompiledModule, kernel: KernelInfo, grid: tuple[int, int, int],
               block: tuple[int, int, int], shared_bytes: int, args: Sequence[bytes], *,
               first_block: int = 0, last_block: int | None = None) -> None:
        """Run the kernel over the grid; returns when every block has run.

        With first_block/last_block, only the blocks of linear index [first, last) run: a
        kernel can be run in slices (blocks are independent), so it can yield the device
        between slices."""
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
                L = _KcLaunch((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block),
                              nblocks, ctypes.addressof(counter), shared_bytes, module._id)
                nw = min(len(self._workers), nblocks - first_block)
                if module.uses_fibers:     # the workers are idle: set up their stacks here
                    for w in self._workers[:nw]:
                        w.ensure_stacks(threads)
                # Blocks until every worker is done (the GIL is released for the call).
                rcs = self._pool.run(run, idx,
                                     ctypes.addressof(argv), ctypes.addressof(L), nw)
                del argbuf, counter, L  # kept alive until every worker has finished
            finally:
                module._release()
        for rc in rcs:
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

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    for i, (a, size, align) in enumerate(zip(args, sizes, aligns)):
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
    for o, b in zip(offsets, blobs):
        ctypes.memmove(base + o, b, len(b))
    argv = array_type(ctypes.c_void_p, max(1, len(sizes)))(*[base + o for o in offsets])
    return (buf, argv), argv
