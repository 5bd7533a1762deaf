"""CUDA kernels on the host: the CPU backend's compiler and launcher.

A module is PTX, or CUDA C source that NVRTC (NVIDIA's own front end, nvrtc.py) compiles to
PTX, exactly as for a GPU. The PTX is translated to C++ (kubecash.broker.ptx) and built by the
host g++ into a shared object:

1. CUDA C: ``#include`` directives are checked on the raw source (the compiler must never
   read a host file for a tenant): headers of the CUDA include directories only.
2. CUDA C: NVRTC compiles it to PTX in a forked child under the build's bounds.
3. The PTX is translated (every name re-spelled: no tenant text reaches g++) and
   ``g++ -O2 -shared -fPIC`` builds it against ``kubecash_runtime.h``; the .so is cached by
   content hash and loaded privately (a fresh copy per load, so two loads never share
   ``__device__`` globals).

:class:`Launcher` runs a kernel's blocks on N persistent native worker threads
(:mod:`kubecash.broker.sandbox`: each confined by a seccomp filter before it runs tenant
code).  Each worker calls the module's ``__kc_run``, grabbing block indices from one shared
atomic counter.  A block's threads run as a plain loop, or, in modules with barriers or warp
operations, as fibers (a stack each, switched by a few instructions of assembly per architecture).

The rooms, in the order a compile goes through them:

- ``errors``      KernelCompileError, UnsupportedConstructError
- ``options``     the tenant's compile options, checked (CompileOptions: NVRTC's arguments)
- ``tokens``      newline normalization, line splicing, the tokenizer
- ``directives``  step 1: #include-like directives on the raw source
- ``nvrtc``       step 2: NVRTC, found by cuda.pathfinder, run in a bounded child
- ``build``       build_module, compile_module: cache, translation, g++, ELF check, stats
- ``loader``      CompiledModule, KernelInfo: a loaded instance and its entry points
- ``launch``      Launcher: the worker threads that run a kernel's blocks
"""
from __future__ import annotations

from .build import build_module, compile_module, stats
from .errors import KernelCompileError, UnsupportedConstructError
from .launch import MAX_COOP_FIBERS, MAX_SHARED_BYTES, CoopTooLarge, Launcher
from .loader import CompiledModule, KernelInfo
from .options import parse_options

__all__ = [
    "KernelCompileError", "UnsupportedConstructError", "build_module", "compile_module", "CompiledModule",
    "KernelInfo", "Launcher", "stats", "MAX_SHARED_BYTES", "MAX_COOP_FIBERS", "CoopTooLarge", "parse_options",
]
