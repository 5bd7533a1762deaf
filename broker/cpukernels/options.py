"""Compile options: the nvcc-style option list a tenant passes, checked and reduced to what
the host compiler is given (C++ dialect, macro definitions, __CUDA_ARCH__)."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .errors import KernelCompileError

_DEFAULT_CUDA_ARCH = 700
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
class CompileOptions:
    std: str
    defines: tuple[str, ...]   # "NAME" or "NAME=VALUE", for the preprocessing run
    arch: int


def parse_options(options: Sequence[str]) -> CompileOptions:
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
    return CompileOptions(std, tuple(defines), arch)
