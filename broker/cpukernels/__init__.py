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

The rooms, in the order a compile goes through them:

- ``errors``      KernelCompileError, UnsupportedConstructError
- ``options``     the tenant's compile options, checked (CompileOptions)
- ``tokens``      newline normalization, line splicing, the tokenizer
- ``directives``  step 1: #include-like directives on the raw source
- ``analyze``     step 3: the preprocessed text checked, its declarations found
- ``generate``    the code appended after the tenant text
- ``build``       build_module, compile_module: cache, g++ runs (steps 2 and 4), ELF check, stats
- ``loader``      CompiledModule, KernelInfo: a loaded instance and its entry points
- ``launch``      Launcher: the worker threads that run a kernel's blocks
"""
from __future__ import annotations

from .build import build_module, compile_module, stats
from .errors import KernelCompileError, UnsupportedConstructError
from .launch import MAX_SHARED_BYTES, Launcher
from .loader import CompiledModule, KernelInfo

__all__ = [
    "KernelCompileError", "UnsupportedConstructError", "build_module", "compile_module", "CompiledModule",
    "KernelInfo", "Launcher", "stats", "MAX_SHARED_BYTES",
]
