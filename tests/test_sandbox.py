"""The CPU backend's sandbox: tenant kernels are native code on the host and must not get
out. Tenant CUDA C and PTX cannot name a host function (the translator refuses external
functions): that is the first wall, tested first. Behind it, each attempt below (open a file,
create a socket, run a program, a raw syscall(), code at module unload) comes from a native
module planted in the tenant's module cache (tests/native.py: what a translator bug would
give a tenant) and is refused by the sandbox: the tenant is told why, the side effect did
not happen, and the broker and the other tenants keep serving. Compiles are bounded."""
from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest
from conftest import needs_seccomp
from kernels import VECADD
from native import plant

import kubecash.client as kc
from kubecash.broker import cpukernels as ck
from kubecash.broker import sandbox as sb
from kubecash.broker.config import ConfigError, parse

pytestmark = pytest.mark.skipif(not sb.arch_supported(), reason="no sandbox table for this CPU")

# Each kernel tries one way out; {path} is a host path it must not create.
ESCAPES = {
    "open": (r'''
        extern "C" int open(const char*, int, ...);
        extern "C" __global__ void k(int* r) { r[0] = open("{path}", 0101 /* O_WRONLY|O_CREAT */, 0644); }
        ''', "openat"),
    "fopen": (r'''
        extern "C" __global__ void k(int* r) { FILE* f = fopen("{path}", "w"); if (f) fputs("x", f); r[0] = f != 0; }
        ''', "openat"),
    "socket": (r'''
        struct sockaddr_un { unsigned short family; char path[108]; };
        extern "C" int socket(int, int, int); extern "C" int bind(int, const void*, unsigned);
        extern "C" __global__ void k(int* r) {
            sockaddr_un a = {1 /* AF_UNIX */, "{path}"};
            int s = socket(1, 1, 0); r[0] = s; if (s >= 0) r[1] = bind(s, &a, sizeof a);
        }''', "socket"),
    "system": (r'''
        extern "C" int system(const char*);
        extern "C" __global__ void k(int* r) { r[0] = system("touch {path}"); }
        ''', None),
    "fork": (r'''
        extern "C" int fork(); extern "C" int creat(const char*, unsigned); extern "C" void _exit(int);
        extern "C" __global__ void k(int* r) {
            int p = fork(); if (p == 0) { creat("{path}", 0644); _exit(0); } r[0] = p; }
        ''', None),
    "execve": (r'''
        extern "C" int execve(const char*, char* const[], char* const[]);
        extern "C" __global__ void k(int* r) {
            const char* argv[] = {"/usr/bin/touch", "{path}", 0};
            r[0] = execve(argv[0], (char* const*)argv, 0);
        }''', "execve"),
    "syscall": (r'''
        extern "C" long syscall(long, ...);
        extern "C" __global__ void k(int* r) {   /* openat(AT_FDCWD, path, O_WRONLY|O_CREAT, 0644) by number */
            r[0] = (int)syscall({openat}, -100, "{path}", 0101, 0644);
        }''', "openat"),
}


def _source(kind: str, path: str) -> tuple[str, str | None]:
    src, name = ESCAPES[kind]
    return src.replace("{path}", path).replace("{openat}", str(_openat_nr())), name


def _openat_nr() -> int:
    return {0xC000003E: 257, 0xC00000B7: 56}[sb.policy()["audit_arch"]]


def _error_of(fn):
    try:
        fn()
    except kc.KubecashError as e:
        return e
    return None


def _bob_still_serves(b) -> None:
    db = b.device("cpu0")
    n = 1024
    x = np.arange(n, dtype=np.float32)
    bx, by = db.allocate(x.nbytes), db.allocate(x.nbytes)
    bx.copy_from(x)
    k = db.load_module(VECADD).get_kernel("vadd")
    db.launch(k, (n // 256,), (256,), [bx, bx, by, n])
    np.testing.assert_array_equal(by.copy_to(np.empty(n, np.float32)), 2 * x)


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_tenant_code_cannot_name_a_host_function(tmp_path, kind):
    src, _ = _source(kind, str(tmp_path / "never"))
    with pytest.raises(ck.KernelCompileError, match="host functions are not allowed|undefined"):
        ck.compile_module(src, cache_dir=tmp_path)
    # Declared as device functions, they are external functions in the PTX: refused there.
    with pytest.raises(ck.KernelCompileError, match="external function|undefined"):
        ck.compile_module(src, ["-default-device"], cache_dir=tmp_path)


def _tenant_cache(broker, tenant: str) -> str:
    return os.path.join(broker.cache_dir, "tenants", tenant)


@needs_seccomp
@pytest.mark.parametrize("kind", list(ESCAPES))
def test_a_kernel_that_tries_to_get_out_is_refused(broker, tmp_path, kind):
    target = str(tmp_path / f"made-by-{kind}")
    src, name = _source(kind, target)
    plant(_tenant_cache(broker, "alice"), src, src)
    with broker.connect("alice") as a, broker.connect("alice") as a2, broker.connect("bob") as b:
        da, da2 = a.device("cpu0"), a2.device("cpu0")
        da2.allocate(16)
        pid = a.status()["devices"]["cpu0"]["pid"]
        r = da.allocate(64)
        k = da.load_module(src).get_kernel("k")
        da.launch(k, (2,), (4,), [r])
        with pytest.raises(kc.LaunchFailedError) as e:
            da.synchronize()
        msg = str(e.value)
        assert "sandbox refused" in msg and "alice" in msg and "SIGSYS" in msg, msg
        if name is not None:       # the executor names the call
            assert f"system call {name} " in msg, msg
        # sticky for every session of alice on that device; the executor is gone
        err = _error_of(lambda: da2.allocate(16))
        assert isinstance(err, kc.LaunchFailedError) and "sandbox refused" in str(err)
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
        # the side effect did not happen
        time.sleep(0.1)
        assert not os.path.exists(target), f"{kind}: {target} was created"
        _bob_still_serves(b)
    with broker.connect("alice") as fresh:          # a new session gets a new executor
        assert fresh.device("cpu0").allocate(16).size == 16


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in "ZX"
    except OSError:
        return True


ALLOWED = r'''
extern "C" __global__ void ok(int* out, int n) {
    __shared__ int s[64];
    int* big = (int*)malloc(8 << 20);           /* mmap'd by malloc */
    big[0] = threadIdx.x; big[(2 << 20) - 1] = 1;
    s[threadIdx.x] = big[0] + big[(2 << 20) - 1];
    free(big);
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x] + n;
    if (threadIdx.x == 0 && blockIdx.x == 0) printf("sandboxed kernel says %d\n", n);
}
'''


@needs_seccomp
def test_what_kernels_need_is_allowed(session):
    """malloc/free (brk, mmap), fibers (__syncthreads: makecontext, _setjmp, mmap'd stacks),
    printf: all inside the sandbox."""
    d = session.device("cpu0")
    out = d.allocate(4 * 64 * 8)
    k = d.load_module(ALLOWED).get_kernel("ok")
    for n in (1, 2):
        d.launch(k, (8,), (64,), [out, n])
    got = out.copy_to(np.empty(64 * 8, np.int32)).reshape(8, 64)
    np.testing.assert_array_equal(got, np.tile(64 - np.arange(64), (8, 1)) + 2)


def test_code_that_would_run_at_load_time_is_refused(session, tmp_path):
    """CUDA has no dynamic initialization of device variables: NVRTC refuses it; and a
    module with initializers or finalizers of its own is refused however it was made."""
    d = session.device("cpu0")
    target = str(tmp_path / "made-at-load")
    loads = (
        f'extern "C" int system(const char*); static int x = system("touch {target}");\n'
        'extern "C" __global__ void k(int* p) { p[0] = x; }',
    )
    for src in loads:
        with pytest.raises(kc.CompileError):
            d.load_module(src)
    for cpp in (f'extern "C" int system(const char*); static int x = system("touch {target}");',
                f'__attribute__((constructor)) static void c() {{ system("touch {target}"); }}'):
        with pytest.raises(ck.UnsupportedConstructError, match="loaded or unloaded"):
            plant(str(tmp_path / "cache"), loads[0], '#include <stdlib.h>\n' + cpp
                  + '\nextern "C" __global__ void k(int* p) {}')
    assert not os.path.exists(target)
    assert d.allocate(16).size == 16                 # nothing else happened


@needs_seccomp
def test_code_that_would_run_at_unload_time_runs_confined(broker, session, tmp_path):
    """A function-local static's destructor runs when the module is unloaded: on a
    confined thread too."""
    d = session.device("cpu0")
    target = str(tmp_path / "made-at-unload")
    src = f'''
        extern "C" int system(const char*);
        struct D {{ int v = 1; ~D() {{ system("touch {target}"); }} }};
        extern "C" __global__ void k(int* p) {{ static D d; p[0] = d.v; }}'''
    plant(_tenant_cache(broker, "alice"), src, src)
    mod = d.load_module(src)
    p = d.allocate(4)
    d.launch(mod.get_kernel("k"), (1,), (1,), [p])
    assert p.copy_to(np.empty(1, np.int32))[0] == 1
    mod.close()
    err = None
    deadline = time.monotonic() + 10
    while err is None and time.monotonic() < deadline:
        err = _error_of(lambda: d.allocate(16))
        time.sleep(0.05)
    assert isinstance(err, kc.LaunchFailedError) and "sandbox refused" in str(err), err
    assert not os.path.exists(target)


def test_sandbox_false_runs_kernels_unconfined(broker_factory, tmp_path):
    """The switch does what it says (and is why it defaults to true): no system call is
    refused. What a root broker's executor sees and which uid it runs as do not depend on
    it: the kernel's files land in its own view (its tenant's directory), not on the host."""
    b = broker_factory(sandbox=False)
    jailed = os.geteuid() == 0
    target = "/tenants/alice/made-unconfined" if jailed else str(tmp_path / "made-unconfined")
    src, _ = _source("open", target)
    plant(_tenant_cache(b, "alice"), src, src)
    with b.connect("alice") as s:
        d = s.device("cpu0")
        r = d.allocate(64)
        d.launch(d.load_module(src).get_kernel("k"), (1,), (1,), [r])
        d.synchronize()
        assert np.frombuffer(r.copy_to(), np.int32)[0] >= 0      # the open succeeded
    if jailed:
        made = os.path.join(b.runtime_dir, "tenants", "alice", "made-unconfined")
        assert os.path.exists(made) and os.stat(made).st_uid != 0
        assert not os.path.exists(target)
    else:
        assert os.path.exists(target)


def test_sandbox_setting_is_a_boolean():
    assert parse({"broker": {}}).broker.sandbox is True
    assert parse({"broker": {"sandbox": False}}).broker.sandbox is False
    with pytest.raises(ConfigError, match="sandbox.*true or false"):
        parse({"broker": {"sandbox": 1}})


# -- the filter itself ----------------------------------------------------------------------

@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "riscv64"])
def test_the_allow_list_per_architecture(machine):
    pol = sb.policy(machine)
    allowed = set(pol["allowed"]) | set(pol["conditional"])
    for name in ("open", "openat", "openat2", "creat", "socket", "connect", "bind", "socketpair",
                 "execve", "execveat", "fork", "vfork", "clone", "clone3", "kill", "tkill",
                 "ptrace", "mount", "chroot", "setuid", "read", "ioctl", "rt_sigaction",
                 "prctl", "seccomp", "process_vm_writev", "memfd_create", "io_uring_setup"):
        assert name not in allowed
    nr = {"x86_64": {"openat": 257, "write": 1, "futex": 202, "mmap": 9},
          "aarch64": {"openat": 56, "write": 64, "futex": 98, "mmap": 222},
          "riscv64": {"openat": 56, "write": 64, "futex": 98, "mmap": 222}}[machine]
    assert pol["conditional"]["write"] == nr["write"] and pol["allowed"]["futex"] == nr["futex"]
    assert sb.syscall_name(nr["openat"], pol["audit_arch"]) == "openat"
    prog = sb.build_filter(1234, machine)
    code, jt, jf, k = struct.unpack_from("<HBBI", prog, 8)
    assert (code, k) == (0x15, pol["audit_arch"])       # the architecture is checked first
    assert len(prog) % 8 == 0 and len(prog) // 8 < 100


@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "riscv64"])
def test_the_executor_process_allow_list_per_architecture(machine):
    """What every thread of a CPU executor may do once it serves (kernels may call into it)."""
    pol = sb.process_policy(machine)
    allowed = set(pol["allowed"])
    for name in ("execve", "execveat", "fork", "vfork", "socket", "socketpair", "connect", "bind",
                 "listen", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
                 "chroot", "pivot_root", "unshare", "setns", "io_uring_setup", "bpf",
                 "perf_event_open", "open_by_handle_at", "keyctl", "init_module", "setuid",
                 "setresuid", "kill", "tkill", "prctl", "ioctl", "clone", "clone3", "memfd_create",
                 "mmap", "fcntl", "setpriority"):
        assert name not in allowed, name
    assert {"clone", "clone3", "kill", "tgkill", "prctl", "ioctl", "mmap", "fcntl"} <= set(pol["conditional"])
    assert {"openat", "read", "accept4", "futex"} <= allowed
    prog = sb.build_process_filter(1234, machine)
    code, jt, jf, k = struct.unpack_from("<HBBI", prog, 8)
    assert (code, k) == (0x15, pol["audit_arch"])
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096      # the kernel's BPF length limit


def test_no_table_no_kernels(monkeypatch):
    monkeypatch.setattr(sb.platform, "machine", lambda: "s390x")
    with pytest.raises(sb.SandboxError, match="s390x.*sandbox = false"):
        ck.Launcher(1)


_CROSS = {"x86_64": "x86_64-linux-gnu-gcc", "aarch64": "aarch64-linux-gnu-gcc", "riscv64": "riscv64-linux-gnu-gcc"}


def _kernel_numbers(compiler: str) -> dict[str, int]:
    """__NR_* of <asm/unistd.h> as that compiler's kernel headers define them."""
    out = subprocess.run([compiler, "-E", "-dM", "-x", "c", "-"], input="#include <asm/unistd.h>\n",
                         capture_output=True, text=True, check=True).stdout
    macros = {}
    for line in out.splitlines():
        m = re.match(r"#define (__NR\w*) (.+)$", line)
        if m:
            macros[m.group(1)] = m.group(2).strip()

    def value(name: str, depth: int = 0) -> int | None:
        text = macros.get(name)
        if text is None or depth > 8:
            return None
        expr = re.sub(r"__NR\w*", lambda t: str(value(t.group(0), depth + 1)), text)
        return int(eval(expr, {"__builtins__": {}})) if re.fullmatch(r"[\d\s+()]+", expr) else None

    return {k[5:]: v for k in macros if k.startswith("__NR_") and (v := value(k)) is not None}


@pytest.mark.parametrize("machine", sorted(_CROSS))
def test_system_call_tables_match_the_kernel_headers(machine):
    """Every name in the sandbox's table for `machine` has the number that architecture's
    kernel headers give it (those of its cross compiler, Debian's gcc-<arch>-linux-gnu),
    and every call either allow-list names exists there."""
    compiler = shutil.which(_CROSS[machine]) or (shutil.which("gcc") if platform.machine() == machine else None)
    if compiler is None:
        pytest.skip(f"no {_CROSS[machine]} for {machine}'s kernel headers")
    kernel = _kernel_numbers(compiler)
    names = sb._ARCHES[machine][1]
    ours = {name: nr for nr, name in enumerate(names) if name != "-"}
    wrong = {n: (nr, kernel[n]) for n, nr in ours.items() if n in kernel and kernel[n] != nr}
    assert not wrong, f"{machine}: ours vs the headers: {wrong}"
    for pol in (sb.policy(machine), sb.process_policy(machine)):
        for group in ("allowed", "conditional"):
            for name, nr in pol[group].items():
                assert kernel.get(name) == nr, f"{machine}: {name} is {nr}, headers say {kernel.get(name)}"


# -- compiles are bounded -------------------------------------------------------------------

# 4^10 copies of 100 terms: NVRTC takes gigabytes and a long time over it.
MACRO_BOMB = ("\n".join([f"#define A0 {'1+' * 100}"]
                        + [f"#define A{i} A{i-1} A{i-1} A{i-1} A{i-1}" for i in range(1, 11)])
              + '\n__device__ int v = A10 0;\nextern "C" __global__ void k(int* p) { p[0] = v; }\n')


def test_a_macro_bomb_is_stopped_with_a_clear_error(session):
    d = session.device("cpu0")
    t0 = time.monotonic()
    with pytest.raises(kc.CompileError, match="out of memory|memory limit|timed out"):
        d.load_module(MACRO_BOMB)
    assert time.monotonic() - t0 < 90
    assert d.allocate(16).size == 16


# 4^13 nested expansions of a tiny macro: minutes of preprocessing, almost no memory.
TIME_BOMB = ("\n".join(["#define A0(x) x"]
                       + [f"#define A{i}(x) A{i-1}(A{i-1}(A{i-1}(A{i-1}(x))))" for i in range(1, 14)])
             + '\nextern "C" __global__ void k(int* p) { p[0] = A13(1); }\n')


def test_compile_time_and_memory_are_bounded(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ck.KernelCompileError, match="timed out"):
        ck.compile_module(TIME_BOMB, cache_dir=tmp_path, timeout_s=2)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ck.KernelCompileError, match="out of memory"):     # NVRTC's own words
        ck.compile_module(MACRO_BOMB, cache_dir=tmp_path, memory_limit_bytes=512 << 20, timeout_s=60)
