"""NVIDIA's CUDA runtime (cudart) on KubeCASH's libcuda.so.1: tests/c/runtime_tour.cu, an
unmodified runtime-API program, built with nvcc 13 (static cudart, the default, and
`-cudart shared`) and against pip's cudart 12 (static and shared), run against a real broker.
cudart reaches the driver through cuGetProcAddress and cuGetExportTable's private tables
(native/src/export_tables.c); these are the tests that show those tables are good enough."""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
from test_native_driver import QUOTA, RUN_TIMEOUT, _libdir
from toolkit import NO_NVCC, NVCC

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "c", "runtime_tour.cu")
# cudart 12 from PyPI (nvidia-cuda-runtime-cu12), installed beside the virtual environment's
# site-packages by `make .venv/.installed` so nothing else finds its headers.
CUDART12 = os.path.join(ROOT, ".venv", "cudart12", "nvidia", "cuda_runtime")

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")


def _crt_include() -> str | None:
    """crt/host_defines.h, which cudart's headers include and only a toolkit ships."""
    for d in ([os.path.join(os.path.dirname(os.path.dirname(NVCC)), "include")] if NVCC else []) + \
            ["/usr/local/cuda/include"]:
        if os.path.isfile(os.path.join(d, "crt", "host_defines.h")):
            return d
    return None


def _pip_cudart13() -> str | None:
    """The virtual environment's nvidia-cuda-runtime 13.x (a newer minor than nvcc's, here)."""
    try:
        import nvidia.cu13
    except ImportError:
        return None
    for p in nvidia.cu13.__path__:
        if os.path.isfile(os.path.join(p, "lib", "libcudart.so.13")):
            return p
    return None


def cudart_dirs() -> list[str]:
    """The directories nvcc links cudart from (its dry run's LIBRARIES line): a program built
    with -cudart shared finds libcudart.so there through its rpath."""
    r = subprocess.run([NVCC, "--dryrun", "-o", os.devnull, SOURCE],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    line = next((x for x in r.stderr.splitlines() if "LIBRARIES=" in x), "")
    return [d for d in re.findall(r'-L"?([^" ]+)', line) if not d.rstrip("/").endswith("stubs")]


def _build(variant: str, out: str) -> list[str]:
    """The command that builds runtime_tour as `variant`, or pytest.skip with why not."""
    if variant.startswith("nvcc"):
        if NVCC is None:
            pytest.skip(NO_NVCC)
        extra = {"nvcc-shared": ["-cudart", "shared"], "nvcc-per-thread": ["--default-stream", "per-thread"]}
        rpath = [f"-Xlinker=-rpath,{d}" for d in cudart_dirs()] if variant == "nvcc-shared" else []
        return [NVCC, "-o", out, SOURCE, *extra.get(variant, []), *rpath]
    major = variant.split("-")[1]
    root = CUDART12 if major == "12" else _pip_cudart13()
    lib = os.path.join(root or "", "lib")
    if not os.path.isfile(os.path.join(lib, f"libcudart.so.{major}")):
        how = (f"make .venv/.installed installs nvidia-cuda-runtime-cu12 into {CUDART12}" if major == "12"
               else "the broker extra's nvidia-cuda-runtime")
        pytest.skip(f"cudart {major} from PyPI not installed ({how}, on x86-64 and aarch64)")
    crt = _crt_include()
    if crt is None or shutil.which("g++") is None:
        pytest.skip("no g++ or no crt/host_defines.h (a CUDA toolkit's) to build against a pip cudart")
    # that cudart's own headers first; the toolkit's only for crt/, which the wheels lack
    cmd = ["g++", "-x", "c++", "-I", os.path.join(root, "include"), "-idirafter", crt, "-o", out, SOURCE, "-x", "none"]
    if variant.endswith("static"):
        return cmd + [os.path.join(lib, "libcudart_static.a"), "-lpthread", "-ldl", "-lrt"]
    return cmd + ["-L", lib, f"-l:libcudart.so.{major}", f"-Wl,-rpath,{lib}", "-lpthread"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime-programs")
    cache: dict[str, str] = {}

    def get(variant: str) -> str:
        if variant not in cache:
            exe = str(out / f"runtime_tour-{variant}")
            cmd = _build(variant, exe)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
            cache[variant] = exe
        return cache[variant]
    return get


def _env(broker: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECASH_BROKER", "KUBECASH_DEBUG")}
    env.update(LD_LIBRARY_PATH=_libdir(), KUBECASH_BROKER=broker, **extra)
    return env


@pytest.fixture
def quota_broker(broker_factory):
    return broker_factory({"alice": {"memory": QUOTA}})


# nvcc-*: the toolkit's nvcc and its cudart (static is nvcc's default; per-thread: the
# per-thread default stream, which cudart asks for as the _ptds entry points); pip-N-*: a
# program built with the host compiler against PyPI's cudart N (as Python packages ship it).
VARIANTS = ["nvcc-static", "nvcc-shared", "nvcc-per-thread", "pip-13-static", "pip-13-shared", "pip-12-static",
            "pip-12-shared"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_runtime_tour(built, quota_broker, variant):
    """Device count and properties, cudaSetDevice, cudaMalloc/cudaMemcpy both ways/cudaFree
    (inline and staged), cudaMemGetInfo (the quota), a cudaMalloc over the quota refused with
    cudaErrorMemoryAllocation, a second thread, cudaDeviceSynchronize, error strings: the
    program checks each and prints what failed."""
    exe = built(variant)
    r = subprocess.run([exe, str(QUOTA)], env=_env(quota_broker.address("alice")), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and "failures=0" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    v = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if variant.startswith("pip"):                                      # the cudart we meant to test
        assert v["runtime_version"].startswith(variant.split("-")[1])
    assert int(v["mem_total"]) == int(v["total_global_mem"]) == QUOTA
    assert v["name"].startswith("KubeCASH CPU")
    # nothing cudart called fell through to a NOT_SUPPORTED stub or an untraced table slot
    assert "not supported" not in r.stderr, r.stderr


@pytest.mark.parametrize("variant", ["nvcc-static", "pip-13-shared"])
def test_counting_devices_starts_no_executor(built, quota_broker, variant):
    """cudaGetDeviceCount opens the session and asks for the primary context's handle
    (CUDART_INTERFACE slot 2), but retains nothing: no executor starts until a context is used."""
    r = subprocess.run([built(variant), "count"], env=_env(quota_broker.address("alice")), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and "device_count=1" in r.stdout, r.stdout + r.stderr[-3000:]
    log = quota_broker.log()
    assert "opened (pid" in log and "executor for" not in log, log[-3000:]


# What each cudart asked for, in order (KUBECASH_DEBUG=1): 12.9 and 13.0 the same six tables;
# 13.5 also TOOLS_CONTEXT, after TOOLS_TLS.
_TABLES = ["cudart_interface", "tools_runtime_hooks", "tools_tls", "context_local_storage", "context_checks",
           "integrity_check"]


@pytest.mark.parametrize("variant, tables", [
    ("nvcc-static", _TABLES), ("pip-12-shared", _TABLES),
    ("pip-13-static", _TABLES[:3] + ["tools_context"] + _TABLES[3:])])
def test_runtime_trace_names_the_tables(built, quota_broker, variant, tables):
    """KUBECASH_DEBUG shows what cudart asked for: its symbols and its tables, in order."""
    exe = built(variant)
    r = subprocess.run([exe, str(QUOTA)], env=_env(quota_broker.address("alice"), KUBECASH_DEBUG="1"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "kubecash: cuGetProcAddress cuInit v2000 flags 0: found" in r.stderr
    asked = [line.split()[-1] for line in r.stderr.splitlines()
             if line.startswith("kubecash: cuGetExportTable ") and len(line.split()) == 3]
    if variant == "nvcc-static" and "tools_context" in asked:          # a newer toolkit's nvcc
        tables = _TABLES[:3] + ["tools_context"] + _TABLES[3:]
    assert asked == tables, r.stderr
    assert "cuGetExportTable f8cff951-2146-8b4e-b9e2-fb469e7c0dd9 refused" in r.stderr
    assert "is not supported" not in r.stderr                          # no stub, no trap called


# -- the integrity check, against an independent HMAC-MD2 -------------------------------------
def _md2_table() -> bytes:
    """RFC 1319's S table, read from the C source: the RFC's vectors below check it too."""
    with open(os.path.join(ROOT, "native", "src", "export_tables.c")) as f:
        text = f.read()
    body = text[text.index("md2_s[256] = {"):]
    return bytes(int(n) for n in re.findall(r"\d+", body[len("md2_s[256] = {"):body.index("};")]))


_MD2_S = _md2_table()


def md2(data: bytes) -> bytes:
    """RFC 1319, written from the RFC (the reference for the C implementation's check)."""
    pad = 16 - len(data) % 16
    data = data + bytes([pad]) * pad
    c, last = bytearray(16), 0
    for i in range(0, len(data), 16):
        for j in range(16):
            c[j] ^= _MD2_S[data[i + j] ^ last]
            last = c[j]
    data += bytes(c)
    x = bytearray(48)
    for i in range(0, len(data), 16):
        for j in range(16):
            x[16 + j] = data[i + j]
            x[32 + j] = x[16 + j] ^ x[j]
        t = 0
        for j in range(18):
            for k in range(48):
                x[k] ^= _MD2_S[t]
                t = x[k]
            t = (t + j) % 256
    return bytes(x[:16])


def test_md2_reference_matches_rfc1319():
    assert len(_MD2_S) == 256 and sorted(_MD2_S) == list(range(256))
    for text, digest in [(b"", "8350e5a3e24c153df2275c9f80692773"), (b"a", "32ec01ec4a6dac72c0ab96fb34c0b5d1"),
                         (b"abc", "da853b0d3f88d99b30283a69e6ded6bb"),
                         (b"message digest", "ab4f496bfb2a530b219ff33031fe06b0"),
                         (b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                          "d5976f79d83d3a0dc9806c3c66f3efd8")]:
        assert md2(text).hex() == digest, text


_PROBE = textwrap.dedent(r"""
    import ctypes, json, os
    cu = ctypes.CDLL("libcuda.so.1")
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    V = ctypes.c_void_p
    def table(uuid_hex):
        t = V()
        rc = cu.cuGetExportTable(ctypes.byref(t), ctypes.create_string_buffer(bytes.fromhex(uuid_hex), 16))
        return rc, t.value
    out = {"null": cu.cuGetExportTable(None, None)}
    assert cu.cuInit(0) == 0
    rc, cudart = table("6bd5fb6c5bf4e74a8987d93912fd9df9")
    rc2, integ = table("d4082055bde6704b8d34ba123c66e1f2")
    out["rc"] = [rc, rc2]
    slots = (V * 3).from_address(integ)
    out["integrity_size"] = slots[0]
    check = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))(slots[1])
    res = (ctypes.c_uint64 * 2)()
    out["fixed"] = [[check(v, 1, res), res[0], res[1]] for v in (13000, 13001)]
    drv, n = ctypes.c_int(), ctypes.c_int()
    cu.cuDriverGetVersion(ctypes.byref(drv)); cu.cuDeviceGetCount(ctypes.byref(n))
    devs = []
    for d in range(n.value):
        u = ctypes.create_string_buffer(16); cu.cuDeviceGetUuid(u, d)
        devs.append(u.raw.hex())
    out.update(driver=drv.value, pid=os.getpid(), tid=libc.pthread_self() & 0xffffffff, cudart=cudart,
               integrity=integ, fn=slots[1], devices=devs, checks=[])
    for version, now in ((13002, 1796000000), (12092, 17)):
        out["checks"].append([version, now, check(version, now, res), res[0], res[1]])
    out["unknown"] = [table("00112233445566778899aabbccddeeff")[0] for _ in range(2)]
    rc, tls = table("42d85a8123f6cb478298f6e78a3aecdc")                  # TOOLS_TLS: a size, traps
    trap = ctypes.CFUNCTYPE(ctypes.c_int)((V * 4).from_address(tls)[1])
    out["trap"] = [rc, trap(), trap()]
    print(json.dumps(out))
""")


def test_integrity_check_is_hmac_md2(quota_broker):
    """The integrity table's answer, recomputed here independently: HMAC-MD2 (RFC 2104) under
    the fixed key, over (driver version, caller's version, pid, thread, the cudart and
    integrity tables' addresses, the function's, the caller's clock) and each device's
    (UUID, PCI domain, bus, device). cudart compares it with its own and stops with error 103
    on a mismatch (tests above pass only if it matches)."""
    r = subprocess.run([sys.executable, "-c", _PROBE], env=_env(quota_broker.address("alice")),
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["null"] == 1 and out["rc"] == [0, 0]                    # CUDA_ERROR_INVALID_VALUE
    assert out["integrity_size"] == 3 * ctypes.sizeof(ctypes.c_void_p)
    assert out["fixed"] == [[0, 0x3341181C03CB675C, 0x8ED383AA1F4CD1E8], [0, 0x1841181C03CB675C, 0x8ED383AA1F4CD1E8]]
    key = bytes.fromhex("146addae53a9a752aa0841360bf55a9f")
    for version, now, rc, lo, hi in out["checks"]:
        msg = struct_pack(out, version, now)
        inner = md2(bytes(b ^ 0x36 for b in key) + msg)
        digest = md2(bytes(b ^ 0x5C for b in key) + inner)
        assert rc == 0 and (lo, hi) == (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"))
    assert out["unknown"] == [801, 801]                                # CUDA_ERROR_NOT_SUPPORTED...
    assert r.stderr.count("cuGetExportTable 00112233-4455-6677-8899-aabbccddeeff is not supported") == 1, r.stderr
    assert out["trap"] == [0, 801, 801]                                # a slot never seen called: refused...
    assert r.stderr.count("export table tools_tls slot 1 is not supported") == 1, r.stderr   # ...said once


def struct_pack(out: dict, version: int, now: int) -> bytes:
    msg = struct.pack("<4I3QQ", out["driver"], version, out["pid"], out["tid"], out["cudart"], out["integrity"],
                      out["fn"], now)
    for u in out["devices"]:                                           # CPU devices: PCI 0:0:0
        msg += bytes.fromhex(u) + struct.pack("<3i", 0, 0, 0)
    return msg


def test_cudart12_wheel_is_where_the_tests_look():
    """The install puts cudart 12 where CUDART12 says (a stale venv skips the 12 variants)."""
    found = glob.glob(os.path.join(ROOT, ".venv", "cudart12", "nvidia", "cuda_runtime", "lib", "libcudart.so.12"))
    if not found:
        pytest.skip("cudart 12 not installed (make .venv/.installed on x86-64 or aarch64)")
    assert found == [os.path.join(CUDART12, "lib", "libcudart.so.12")]


_CONTEXTS = textwrap.dedent(r"""
    import ctypes, json
    cu = ctypes.CDLL("libcuda.so.1")
    V, U, I = ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
    out = {}
    assert cu.cuInit(0) == 0
    ctx, cur, popped = V(), V(), V()
    out["retain"] = cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0)
    flags, active = U(), I()
    rc = cu.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active))
    out["state"] = [rc, flags.value, active.value]
    out["set_flags"] = cu.cuDevicePrimaryCtxSetFlags_v2(0, 4)              # CU_CTX_SCHED_BLOCKING_SYNC
    out["bad_flags"] = cu.cuDevicePrimaryCtxSetFlags_v2(0, 1 << 20)
    cu.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active))
    out["flags_after"] = flags.value
    out["pop_empty"] = cu.cuCtxPopCurrent_v2(ctypes.byref(popped))
    out["push"] = cu.cuCtxPushCurrent_v2(ctx)
    cu.cuCtxGetCurrent(ctypes.byref(cur))
    out["current_is_pushed"] = cur.value == ctx.value
    out["push_bad"] = cu.cuCtxPushCurrent_v2(V(12345))
    ver, cid, dev, ctx_flags = U(), ctypes.c_ulonglong(), I(-1), U()
    out["api_version"] = [cu.cuCtxGetApiVersion(ctx, ctypes.byref(ver)), ver.value]
    out["api_version_bad"] = [cu.cuCtxGetApiVersion(V(12345), ctypes.byref(ver)),
                              cu.cuCtxGetApiVersion(V(ctx.value + 1), ctypes.byref(ver))]   # inside a handle
    out["id"] = [cu.cuCtxGetId(None, ctypes.byref(cid)), cid.value]
    out["get_device_v2"] = [cu.cuCtxGetDevice_v2(ctypes.byref(dev), None), dev.value]
    out["ctx_flags"] = [cu.cuCtxGetFlags(ctypes.byref(ctx_flags)), ctx_flags.value]
    out["sync_v2"] = cu.cuCtxSynchronize_v2(ctx)
    lim = ctypes.c_size_t()
    out["limit_default"] = [cu.cuCtxGetLimit(ctypes.byref(lim), 2), lim.value]      # MALLOC_HEAP_SIZE
    out["limit_readonly"] = cu.cuCtxSetLimit(7, 1)                                   # SHMEM_SIZE
    out["limit_bad"] = [cu.cuCtxGetLimit(ctypes.byref(lim), 99), cu.cuCtxGetLimit(None, 0)]
    out["pop"] = cu.cuCtxPopCurrent_v2(ctypes.byref(popped))
    out["popped_is_pushed"] = popped.value == ctx.value
    cu.cuCtxGetCurrent(ctypes.byref(cur))
    out["current_after_pop"] = cur.value
    out["no_ctx"] = cu.cuCtxGetApiVersion(None, ctypes.byref(ver))
    mode = I()
    out["loading_mode"] = [cu.cuModuleGetLoadingMode(ctypes.byref(mode)), mode.value]
    out["reset"] = cu.cuDevicePrimaryCtxReset_v2(0)
    out["reset_bad"] = cu.cuDevicePrimaryCtxReset_v2(7)
    print(json.dumps(out))
""")


def test_context_stack_and_state(quota_broker):
    """The per-thread context stack (push, pop, set), the context queries cudart's start-up
    makes, limits, the module loading mode, reset; bad handles refused, not crashed on."""
    r = subprocess.run([sys.executable, "-c", _CONTEXTS], env=_env(quota_broker.address("alice")),
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    v = json.loads(r.stdout)
    assert v["retain"] == 0 and v["state"] == [0, 0, 1]
    assert v["set_flags"] == 0 and v["bad_flags"] == 1 and v["flags_after"] == 4
    assert v["pop_empty"] == 201 and v["push"] == 0 and v["current_is_pushed"] and v["push_bad"] == 201
    assert v["api_version"] == [0, 3020] and v["api_version_bad"] == [201, 201]
    assert v["id"] == [0, 1] and v["get_device_v2"] == [0, 0] and v["ctx_flags"] == [0, 4]
    assert v["sync_v2"] == 0
    assert v["limit_default"] == [0, 8 << 20] and v["limit_readonly"] == 1 and v["limit_bad"] == [1, 1]
    assert v["pop"] == 0 and v["popped_is_pushed"] and v["current_after_pop"] is None
    assert v["no_ctx"] == 201                                          # CUDA_ERROR_INVALID_CONTEXT
    assert v["loading_mode"] == [0, 2]                                 # CU_MODULE_LAZY_LOADING
    assert v["reset"] == 0 and v["reset_bad"] == 101
    assert "not supported" not in r.stderr, r.stderr


_CUDA_PYTHON_RUNTIME = textwrap.dedent(r"""
    import numpy as np
    from cuda.bindings import runtime as rt
    ok = rt.cudaError_t.cudaSuccess
    assert rt.cudaGetDeviceCount() == (ok, 1)
    err, p = rt.cudaGetDeviceProperties(0)
    assert err == ok and p.totalGlobalMem == QUOTA, (err, p.totalGlobalMem)
    err, d = rt.cudaMalloc(1 << 20)
    assert err == ok
    a = np.arange(1000, dtype=np.float32)
    b = np.zeros_like(a)
    H2D, D2H = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    assert rt.cudaMemcpy(d, a.ctypes.data, a.nbytes, H2D) == (ok,)
    assert rt.cudaMemcpy(b.ctypes.data, d, a.nbytes, D2H) == (ok,)
    assert (a == b).all()
    err, free, total = rt.cudaMemGetInfo()
    assert err == ok and total == QUOTA
    assert rt.cudaMalloc(QUOTA)[0] == rt.cudaError_t.cudaErrorMemoryAllocation
    assert rt.cudaFree(d) == (ok,)
    assert rt.cudaDeviceSynchronize() == (ok,)
    print("done", rt.cudaRuntimeGetVersion()[1])
""")


def test_cuda_python_runtime_bindings_run_on_the_native_driver(quota_broker):
    """cuda-python's runtime module links cudart statically (13.4 in cuda-bindings 13.x): with
    the Python shim off, it initialises on the export tables and reaches the broker."""
    pytest.importorskip("cuda.bindings.runtime")
    pytest.importorskip("numpy")
    env = _env(quota_broker.address("alice"), KUBECASH_SHIM="0")
    r = subprocess.run([sys.executable, "-c", f"QUOTA = {QUOTA}\n" + _CUDA_PYTHON_RUNTIME], env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0 and r.stdout.startswith("done 13"), r.stdout + r.stderr[-3000:]
    assert "not supported" not in r.stderr, r.stderr
