"""Native modules planted in a module cache: what a kernel could do if tenant code reached
native calls (a translator bug, a poisoned cache). Tenant CUDA C and PTX cannot call host
functions (the translator refuses external functions), so the sandbox and the confinement
behind it are tested with modules built here, from C++ against the runtime header, and
filed under the cache key of a CUDA C source: loading that source loads them."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

from kubecash.broker.cpukernels import build as B


def plant(cache_dir: str, source: str, cpp: str, *, fibers: bool = False) -> str:
    """Build C++ `cpp` (kernels: extern "C" __global__ functions, as CUDA C spells them) and
    file it where loading CUDA C `source` finds it. Returns the cached path."""
    os.makedirs(cache_dir, exist_ok=True)
    path = B.cache_path(cache_dir, source)
    kernels = re.findall(r'extern "C" __global__ void (\w+)\s*\(', cpp)
    tu = (f"#define __KC_FIBERS {int(fibers)}\n#include \"kubecash_runtime.h\"\n#include <stdio.h>\n"
          + cpp.replace("__global__ ", "").replace("__shared__", "static thread_local") + "\n"
          + "static const ::__kc::KernelEntry __kc_kernel_table[] = {\n"
          + "".join(f'    __KC_KERNEL("{k}", "{k}", {k})\n' for k in kernels)
          + "    { nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr } };\n"
          + "static const ::__kc::VarEntry __kc_var_table[] = { { nullptr, nullptr, nullptr, 0 } };\n"
          + "__KC_EXPORTS\n")
    work = tempfile.mkdtemp(dir=cache_dir)
    try:
        B._link(tu, path, std="c++17", work=work, deadline=time.monotonic() + 120, memory_limit_bytes=2 << 30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.chmod(path, 0o644)
    return str(path)
