"""Compile options: the nvcc/NVRTC-style option list a tenant passes, checked and reduced to
the NVRTC options the CPU backend compiles with. Anything that would read or write a file
(-I, -include, -time, ...) or produce something other than PTX (-rdc=true, -dlto, ...) is
refused; options that only matter to a GPU's own back end are accepted and dropped."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .errors import KernelCompileError

_DEFAULT_ARCH = "compute_80"      # the CPU device's compute capability (broker/devices.py)
_MIN_ARCH = 75                    # the oldest NVRTC 13 compiles for
_STDS = ("c++03", "c++11", "c++14", "c++17", "c++20")
_MACRO_NAME = re.compile(r"[A-Za-z_]\w*(?:\([\w\s,.]*\))?\Z")
# Passed to NVRTC as they are: they change what the front end and NVVM make of the source.
_FORWARDED = re.compile(
    r"(?:-default-device|--device-as-default-execution-space|-?-use_fast_math"
    r"|-?-(?:ftz|prec-div|prec-sqrt|fmad)=(?:true|false)|-restrict|--restrict"
    r"|-?-extra-device-vectorization|-w|--disable-warnings|-dopt=(?:on|off)|--dopt=(?:on|off)"
    r"|-?-device-int128|-lineinfo|--generate-line-info)\Z")
# Accepted and dropped: a GPU back end's concerns (registers, ptxas, debug info for cuda-gdb).
_DROPPED = re.compile(
    r"(?:-G|--device-debug|-rdc=false|--relocatable-device-code=false|-maxrregcount=\d+"
    r"|--maxrregcount=\d+|-Xptxas=.*|--ptxas-options=.*|-Wno-deprecated-gpu-targets)\Z", re.S)
_ARCH_OPTION = re.compile(r"(?:-arch|--gpu-architecture)(?:[=\s]+|\Z)(.*)", re.S)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    args: tuple[str, ...]    # NVRTC's options, in order
    arch: str                # compute_XX[a|f]: the virtual architecture the PTX is for
    std: str = "c++17"       # the C++ dialect (the directive check tokenizes as it does)


def _check_text(o: str) -> None:
    if "\n" in o or "\r" in o or "\0" in o:
        raise KernelCompileError(f"compile option {o!r} contains a line break or NUL")


def parse_options(options: Sequence[str]) -> CompileOptions:
    if isinstance(options, (str, bytes)):
        raise KernelCompileError("options must be a sequence of strings, not one string")
    args: list[str] = []
    std, arch = "c++17", _DEFAULT_ARCH
    opts = list(options)
    i = 0
    while i < len(opts):
        o = opts[i]
        if not isinstance(o, str):
            raise KernelCompileError(f"compile option {o!r} is not a string")
        _check_text(o)
        i += 1
        if o in ("-D", "--define-macro", "-U", "--undefine-macro"):
            if i >= len(opts) or not isinstance(opts[i], str):
                raise KernelCompileError(f"compile option {o} needs a macro")
            o, i = ("-D" if o in ("-D", "--define-macro") else "-U") + opts[i], i + 1
            _check_text(o)
        elif o.startswith(("--define-macro=", "--undefine-macro=")):
            o = ("-D" if o.startswith("--d") else "-U") + o.split("=", 1)[1]
        if o.startswith(("-D", "-U")):
            d = o[2:].lstrip()
            name = d.partition("=")[0]
            if not _MACRO_NAME.match(name) or (o[1] == "U" and "=" in d):
                raise KernelCompileError(f"compile option {o!r}: not a macro name")
            # A definition is source text too: what the directive check refuses there.
            if re.search(r"__has_include|_Pragma|dependency|#|\?\?|%:", d):
                raise KernelCompileError(f"compile option {o!r}: a macro value may not probe files or "
                                         "hold directives")
            args.append(o[:2] + d)
        elif o.startswith(("-std=", "--std=")):
            v = o.split("=", 1)[1]
            if v not in _STDS:
                raise KernelCompileError(f"compile option {o!r}: unsupported C++ standard "
                                         f"(accepted: {', '.join(_STDS)})")
            std = v
        elif (m := _ARCH_OPTION.match(o)):
            v = m.group(1)
            if not v and o in ("-arch", "--gpu-architecture") and i < len(opts) and isinstance(opts[i], str):
                v, i = opts[i], i + 1
            # The CPU device runs PTX: sm_90a and compute_90a alike mean PTX for compute_90a.
            am = re.fullmatch(r"(?:sm|compute)_(\d+)([af]?)", v)
            if not am or int(am.group(1)) < _MIN_ARCH:
                raise KernelCompileError(f"compile option {o} {v}: not an architecture NVRTC compiles for "
                                         f"(compute_{_MIN_ARCH} or later, or sm_XX)".replace(f"{o} {o}", o))
            arch = f"compute_{am.group(1)}{am.group(2)}"
        elif _FORWARDED.match(o):
            args.append(o)
        elif _DROPPED.match(o):
            pass
        else:
            raise KernelCompileError(f"compile option {o!r} is not accepted by the CPU backend")
    return CompileOptions((f"--gpu-architecture={arch}", f"--std={std}", *args), arch, std)
