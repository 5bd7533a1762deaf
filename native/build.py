"""Compile libcuda.so.1 and libnvidia-ml.so.1 from native/src with the system C compiler.

Run by the package's build backend (shim/_build/kubecash_build.py) before every wheel and
editable build, and usable alone: `python native/build.py [outdir]`. Standard library only
(the backend runs it before anything is installed). The checked-in generated sources are
all it needs: no CUDA headers, no toolkit.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
LIBDIR = os.path.join(HERE, "lib")

COMMON = ("mpack.c", "zmtp.c", "session.c", "sha256.c")
LIBRARIES = {
    "libcuda.so.1": COMMON + ("cuda_api.c", "cuda_exec.c", "cuda_more.c", "cuda_graph.c", "cuda_link.c",
                              "cuda_vmm.c", "cuda_logs.c",
                              "export_tables.c",
                              "runtime_init.c", "gen_surface.c", "gen_devattr.c"),
    "libnvidia-ml.so.1": COMMON + ("nvml.c", "gen_nvml.c"),
}
# Hidden by default: only what KC_EXPORT marks (the CUDA and NVML names) is exported, so the
# libraries' helpers never collide with a program's symbols. -z defs: a table entry without
# a C definition fails the link instead of the first call. -z nodelete: dlclose leaves the
# libraries loaded, since the heartbeat thread runs their code until the process ends.
# What GCC 14 makes errors (Debian trixie's compiler) is an error with every compiler: a
# missing #include must not build here and fail there.
CFLAGS = ("-std=gnu11", "-O2", "-g", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror=implicit-function-declaration", "-Werror=implicit-int",
          "-Werror=int-conversion", "-Werror=incompatible-pointer-types", "-pthread")
LDFLAGS = ("-shared", "-Wl,-z,defs", "-Wl,-z,nodelete", "-Wl,--as-needed", "-pthread")


def package_version() -> str:
    """The package's version (pyproject.toml's, beside native/): what NVML's version calls
    report, as the shim's do."""
    with open(os.path.join(os.path.dirname(HERE), "pyproject.toml")) as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    if not m:
        raise RuntimeError("pyproject.toml has no version")
    return m.group(1)


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def build(outdir: str = LIBDIR) -> list[str]:
    """Build both libraries into `outdir` (each replaced atomically); return their paths."""
    os.makedirs(outdir, exist_ok=True)
    built = []
    for name, sources in LIBRARIES.items():
        final = os.path.join(outdir, name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=outdir)
        os.close(fd)
        cmd = [*compiler(), *CFLAGS, f'-DKC_PACKAGE_VERSION="{package_version()}"', "-I", SRC,
               *(os.path.join(SRC, s) for s in sources),
               *LDFLAGS, f"-Wl,-soname,{name}", "-o", tmp, "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode:
                raise RuntimeError(f"building {name} failed ({shlex.join(cmd)}):\n{r.stderr[-8000:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        built.append(final)
    return built


if __name__ == "__main__":
    for p in build(*sys.argv[1:2]):
        print(p)
