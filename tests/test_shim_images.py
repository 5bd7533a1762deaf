"""CUBINs NVRTC made tied to their PTX, kernel signatures from PTX, image bytes however
they are named, kernel arguments in both forms, and the injection hook in built wheels.
Real NVRTC, no broker."""
from __future__ import annotations

import base64
import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

from conftest import ROOT  # noqa: E402

from kubecash.client.errors import CudaError  # noqa: E402
from kubecash.shim import images, ops  # noqa: E402
from kubecash.shim.state import Func  # noqa: E402

SRC = rb"""
struct Pair { double a; float b; };
extern "C" __global__ void k(const float* x, int n, double d, char c, Pair p, unsigned long long m,
                             short s) { }
"""


def compile_nvrtc(src: bytes, arch: str) -> bytes:
    err, prog = nvrtc.nvrtcCreateProgram(src, b"t.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    assert nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture={arch}".encode()])[0] == 0
    if arch.startswith("sm_"):
        n = nvrtc.nvrtcGetCUBINSize(prog)[1]
        buf = b" " * n
        nvrtc.nvrtcGetCUBIN(prog, buf)
    else:
        n = nvrtc.nvrtcGetPTXSize(prog)[1]
        buf = b" " * n
        nvrtc.nvrtcGetPTX(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    return buf


def test_ptx_entry_parameters_give_each_parameters_size():
    ptx = compile_nvrtc(SRC, "compute_80")
    assert images.ptx_signatures(ptx) == {"k": (8, 4, 8, 1, 16, 8, 2)}
    assert images.ptx_signatures(compile_nvrtc(SRC, "sm_80")) is None    # a CUBIN: not PTX


def test_a_cubin_is_tied_to_its_programs_ptx_however_it_comes_back():
    reg = images.Registry()
    cubin, ptx = compile_nvrtc(SRC, "sm_80"), compile_nvrtc(SRC, "compute_80")
    reg.add(cubin, ptx)
    assert reg.ptx_for(bytes(np.char.array(cubin).tobytes())) == ptx.rstrip(b"\0")
    assert reg.ptx_for(cubin.rstrip(b"\0") + b"\0\0\0") == ptx.rstrip(b"\0")
    assert reg.ptx_for(cubin[:-8] + b"\1" * 8) is None        # other bytes: unknown
    for i in range(2 * images.MAX_TIED):                     # bounded: the oldest go first
        reg.add(i.to_bytes(8, "little"), b"x")
    assert reg.ptx_for(cubin) is None


def test_image_bytes_from_an_address_take_the_images_own_length():
    cubin = compile_nvrtc(SRC, "sm_80")
    buf = ctypes.create_string_buffer(cubin + b"\xAA" * 64)     # trailing bytes are not image
    assert images.image_bytes(ctypes.addressof(buf)) == cubin
    ptx = compile_nvrtc(SRC, "compute_80")
    pbuf = ctypes.create_string_buffer(ptx.rstrip(b"\0"))
    assert images.image_bytes(ctypes.addressof(pbuf)) == ptx.rstrip(b"\0")
    assert images.image_bytes(np.frombuffer(cubin, np.uint8)) == cubin
    with pytest.raises(CudaError):
        images.image_bytes(0)


def test_kernel_arguments_in_both_forms():
    f = Func(0, 1, "k", (8, 4, 8, 1, 16, 8, 2), 1)

    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_double), ("b", ctypes.c_float)]
    from cuda.bindings import driver
    tuple_form = ((driver.CUdeviceptr(0x1000), 7, 2.5, b"z", Pair(1.0, 2.0), np.uint64(9), -3),
                  (None, ctypes.c_int, ctypes.c_double, ctypes.c_char, None, ctypes.c_ulonglong,
                   ctypes.c_short))
    a = ops.encode_params(tuple_form, f)
    assert [len(x) for x in a] == [8, 4, 8, 1, 16, 8, 2]
    assert int.from_bytes(a[0], "little") == 0x1000 and a[3] == b"z"
    # The C form: void*[] of pointers to each value; sizes from the signature.
    vals = [np.array([0x1000], np.uint64), np.array([7], np.int32), np.array([2.5]),
            np.array([ord("z")], np.int8), np.frombuffer(bytes(Pair(1.0, 2.0)), np.uint8).copy(),
            np.array([9], np.uint64), np.array([-3], np.int16)]
    ptrs = np.array([v.ctypes.data for v in vals], np.uint64)
    assert ops.encode_params(ptrs.ctypes.data, f) == a
    assert ops.encode_params(ptrs, f) == a                    # the array itself works too
    with pytest.raises(CudaError) as e:
        ops.encode_params(ptrs.ctypes.data, Func(0, 1, "k", None, 1))
    assert "parameter sizes are unknown" in e.value.message
    with pytest.raises(TypeError):                            # as cuda-python: None needs a handle
        ops.encode_params(((5,), (None,)), Func(0, 1, "k", (8,), 1))


@pytest.mark.slow
def test_built_wheel_carries_the_injection_hook(tmp_path):
    """A regular (non-editable) install gets kubecash_shim.pth at the top of site-packages."""
    src = tmp_path / "src"             # build from a copy: no build/ left in the work tree
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for d in ("kubecash", "broker", "client", "shim", "native"):     # native: the backend builds its libraries
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    code = ("import sys; sys.path.insert(0, 'shim/_build'); import kubecash_build; "
            f"print(kubecash_build.build_wheel({str(tmp_path)!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = tmp_path / r.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        pth = z.read("kubecash_shim.pth")
        # every module and header of the tree is in the wheel (subpackages listed in pyproject)
        shipped = set(z.namelist())
        for d, pkg in (("kubecash", "kubecash"), ("broker", "kubecash/broker"), ("client", "kubecash/client"),
                       ("shim", "kubecash/shim"), ("native", "kubecash/native")):
            for path in glob.glob(os.path.join(ROOT, d, "**", "*.[ph]*"), recursive=True):
                rel = os.path.relpath(path, os.path.join(ROOT, d))
                if path.endswith((".py", ".h")) and not rel.startswith("_build"):
                    assert f"{pkg}/{rel}" in shipped, f"the wheel lacks {pkg}/{rel}"
        assert {"kubecash/native/lib/libcuda.so.1", "kubecash/native/lib/libnvidia-ml.so.1"} <= shipped
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        lines = z.read(record).decode().splitlines()
        z.extractall(tmp_path / "site")
    digest = base64.urlsafe_b64encode(hashlib.sha256(pth).digest()).rstrip(b"=").decode()
    assert f"kubecash_shim.pth,sha256={digest},{len(pth)}" in lines
    # That site directory alone (no editable install, site's .pth processing) injects.
    venv_site = [p for p in sys.path if p.endswith("site-packages")]
    probe = ("import sys, site; sys.path[:0] = []; "
             f"sys.path.insert(0, {str(tmp_path / 'site')!r}); sys.path += {venv_site!r}; "
             f"site.addsitedir({str(tmp_path / 'site')!r}); "
             "import kubecash, cuda.bindings.driver as d; "
             "print(kubecash.__file__.startswith(sys.path[0]), getattr(d, '__kubecash_shim__', None))")
    env = dict(os.environ, KUBECASH_BROKER="ipc:///nonexistent/sock")
    r = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                       timeout=60, env=env, cwd=str(tmp_path))
    assert r.stdout.split() == ["True", "cuda.bindings.driver"], r.stderr
