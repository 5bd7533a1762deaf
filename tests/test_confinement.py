"""A tenant's code reaches nothing but its own tenant (issue #13): a root broker's executors
and compile helpers run unprivileged, in a view of their own, every thread under seccomp;
and root never acts on a path inside a tenant's directory that the tenant could redirect.

Each test here is an attack that worked before: a kernel calling into its executor's
Python (R1), the preprocessor probing host files (R8), a symlink where shm/ was (R2), a
socket swapped for a symlink as it is made (R3). Tenant CUDA C can no longer name a host
function (the PTX translator refuses external functions), so the kernels of R1 are native
modules planted in the tenant's module cache (tests/native.py): what a translator bug would
give a tenant. The confinement must hold against them all the same."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import psutil
import pytest
from conftest import BrokerProcess, needs_seccomp, wait_for
from kernels import run_vadd
from native import plant

import kubecash.client as kc
from kubecash.broker import sandbox as sb

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs a root broker (as in production)"),
    pytest.mark.skipif(not sb.arch_supported(), reason="no sandbox table for this CPU"),
    needs_seccomp,      # the executor's whole-process filter is part of what is checked
]
NOBODY = 65534

# A kernel hands its executor's main thread a line of Python to run, as root it used to be.
PENDING_CALL = r"""
extern "C" int Py_AddPendingCall(int (*)(void*), void*);
extern "C" int PyRun_SimpleString(const char*);
extern "C" __global__ void k(const char* code, int* r) {
    r[0] = Py_AddPendingCall((int (*)(void*))PyRun_SimpleString, (void*)code);
}
"""

# What it runs: every way out it can think of, written down where the test can read it
# (its tenant's directory: the one place it can write), then a fork.
PROBE = textwrap.dedent("""
    import os, json
    r = {"uid": os.getresuid(), "gid": os.getresgid(), "root": sorted(os.listdir("/"))}
    def attempt(name, fn):
        try:
            fn()
            r[name] = "done"
        except BaseException as e:
            r[name] = type(e).__name__
    attempt("host_file", lambda: open({host!r}, "w"))
    attempt("passwd", lambda: open("/etc/passwd"))
    attempt("other_memory", lambda: open("/proc/{other}/mem", "rb"))
    attempt("chroot_escape", lambda: os.listdir("/../../etc"))
    import mmap, ctypes, stat as st      # (modules the executor has loaded: its view has no others)
    attempt("shared_memory", lambda: mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED))
    libc = ctypes.CDLL(None, use_errno=True)
    r["sigio_owner"] = "PermissionError" if libc.fcntl(0, 8, 1) == -1 and ctypes.get_errno() == 1 else "allowed"
    r["stderr_is_pipe"] = st.S_ISFIFO(os.fstat(2).st_mode)
    attempt("truncate_stderr", lambda: os.ftruncate(2, 0))
    os.write(2, b"FORGED kubecash.broker ERROR tenant bob: evil\\n")
    where = "/tenants/alice" if os.path.isdir("/tenants/alice") else {tdir!r}
    with open(where + "/probe.json", "w") as f:
        json.dump(r, f)
    os.system("true")
""")


def _executor(b, tenant: str) -> psutil.Process:
    def find():
        for p in psutil.Process(b.proc.pid).children():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "kubecash.broker.executor" in cmd and cmd[cmd.index("--tenant") + 1] == tenant:
                return p
        return None
    return wait_for(find, 30, f"the executor of {tenant}")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_a_kernel_calling_its_executors_python_gets_nothing_but_its_tenant(broker_factory, tmp_path):
    """R1: Py_AddPendingCall(PyRun_SimpleString, code) from a kernel. The code runs, on the
    executor's main thread, but as an unprivileged uid whose whole world is the tenant's own
    directory; its fork is refused and ends that executor only."""
    b = broker_factory()
    host_target = str(tmp_path / "written-by-a-kernel")
    with b.connect("bob") as bob, b.connect("alice") as alice:
        bd = bob.device("cpu0")
        secret = np.full(4096, 7, np.uint8)
        bbuf = bd.allocate(secret.nbytes)
        bbuf.copy_from(secret)
        other = _executor(b, "bob").pid
        d = alice.device("cpu0")
        tdir = os.path.join(b.runtime_dir, "tenants", "alice")
        code = (PROBE.replace("{host!r}", repr(host_target)).replace("{other}", str(other))
                .replace("{tdir!r}", repr(tdir)).encode() + b"\0")
        cbuf, r = d.allocate(len(code)), d.allocate(8)
        cbuf.copy_from(code)
        plant(os.path.join(b.cache_dir, "tenants", "alice"), PENDING_CALL, PENDING_CALL)
        d.launch(d.load_module(PENDING_CALL).get_kernel("k"), (1,), (1,), [cbuf, r])
        report = os.path.join(b.runtime_dir, "tenants", "alice", "probe.json")
        wait_for(lambda: os.path.exists(report) and os.path.getsize(report), 30, "the probe's report")
        with pytest.raises(kc.KubecashError, match="SIGSYS"):
            for _ in range(200):            # the fork ends alice's executor
                d.synchronize()
                time.sleep(0.05)
        run_vadd(bd)                       # bob: untouched, and still served
        np.testing.assert_array_equal(bbuf.copy_to(np.empty(4096, np.uint8)), secret)
    with open(report) as f:
        got = json.load(f)
    assert 0 not in got["uid"] and 0 not in got["gid"], got
    assert got["root"] == ["modules", "tenants"], got
    for attempt in ("host_file", "passwd", "other_memory", "chroot_escape"):
        assert got[attempt] in ("FileNotFoundError", "PermissionError"), (attempt, got)
    assert not os.path.exists(host_target)
    # Shared anonymous memory (outside the executor's memory bound) and SIGIO ownership: no.
    assert got["shared_memory"] == got["sigio_owner"] == "PermissionError", got
    # Its stderr is a pipe the broker reads, not the broker's log: nothing to truncate, and
    # what it writes there is logged as its own words.
    assert got["stderr_is_pipe"] and got["truncate_stderr"] == "OSError", got
    forged = [x for x in b.log().splitlines() if "FORGED" in x]
    assert forged and all("tenant alice: executor for cpu0 says: FORGED" in x for x in forged), forged
    assert "serving 2 tenant(s)" in b.log()


def test_executors_and_helpers_run_unprivileged_with_every_thread_filtered(broker_factory):
    """R1: the tenant's owner uid (or an allocated one), no_new_privs, seccomp on every
    thread, a root of their own; and not dumpable, so a process of the same uid (the
    tenant's own client) cannot read the executor's memory either."""
    b = broker_factory({"web": {"owner": f"{NOBODY}:{NOBODY}"}, "ops": {}})
    with b.connect("web") as web, b.connect("ops") as ops:
        run_vadd(web.device("cpu0"))
        run_vadd(ops.device("cpu0"))
        uids = {}
        for tenant in ("web", "ops"):
            ex = _executor(b, tenant)
            st = _status(ex.pid)
            uid = int(st["Uid"].split()[0])
            assert st["Uid"].split() == [str(uid)] * 4 and uid != 0, st["Uid"]
            assert st["Gid"].split()[0] != "0" and st["Groups"].strip() == ""
            assert st["NoNewPrivs"] == "1"
            threads = os.listdir(f"/proc/{ex.pid}/task")
            assert len(threads) > 3                         # main, zmq, runner, kernel workers...
            for tid in threads:
                assert _status(int(tid))["Seccomp"] == "2", (tenant, tid)
            assert sorted(os.listdir(f"/proc/{ex.pid}/root")) == ["modules", "tenants"]
            helpers = ex.children()
            assert len(helpers) == 1
            hs = _status(helpers[0].pid)
            assert hs["Uid"].split() == [str(uid)] * 4 and hs["NoNewPrivs"] == "1"
            assert "etc" in os.listdir(f"/proc/{helpers[0].pid}/root")   # ld.so.cache alone
            assert os.listdir(f"/proc/{helpers[0].pid}/root/etc") == ["ld.so.cache"]
            uids[tenant] = uid
        assert uids["web"] == NOBODY and 61184 <= uids["ops"] <= 65519
        pid = _executor(b, "web").pid
        peek = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                import os
                os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
                try:
                    open("/proc/{pid}/mem", "rb").close()
                    print("read")
                except PermissionError:
                    print("refused")""")], capture_output=True, text=True, timeout=60)
        assert peek.stdout.strip() == "refused", (peek.stdout, peek.stderr)


def test_an_exit_handler_a_kernel_registers_cannot_start_a_program(broker_factory):
    """R1: __cxa_atexit(system, ...) runs at the executor's exit, where fork is refused."""
    b = broker_factory()
    src = r"""
    extern "C" int __cxa_atexit(void (*)(void*), void*, void*);
    extern "C" int system(const char*);
    extern "C" __global__ void k(const char* cmd, int* r) {
        r[0] = __cxa_atexit((void (*)(void*))system, (void*)cmd, 0);
    }"""
    made = os.path.join(b.runtime_dir, "tenants", "alice", "atexit-ran")
    plant(os.path.join(b.cache_dir, "tenants", "alice"), src, src)
    with b.connect("alice") as s:
        d = s.device("cpu0")
        cmd = b"/bin/sh -c 'echo > /tenants/alice/atexit-ran'\0"
        c, r = d.allocate(len(cmd)), d.allocate(8)
        c.copy_from(cmd)
        d.launch(d.load_module(src).get_kernel("k"), (1,), (1,), [c, r])
        d.synchronize()
        assert np.frombuffer(r.copy_to(), np.int32)[0] == 0       # registered
    line = wait_for(lambda: [x for x in b.log().splitlines() if "executor for cpu0 ended" in x],
                    30, "the executor's exit")
    assert "SIGSYS" in line[0], line              # system() at exit: its fork refused
    assert not os.path.exists(made)


# The preprocessor's own oracles, spelled so that no directive check sees them.
HAS_INCLUDE = r"""
#define PASTE(a, b) a##b
#if PASTE(__has_, include)("{probe}")
#define SEEN 1
#else
#define SEEN 0
#endif
#if PASTE(__has_, include)(<cuda_fp16.h>)
#define HEADERS 1
#else
#define HEADERS 0
#endif
extern "C" __global__ void k(int* r) { r[0] = SEEN; r[1] = HEADERS; }
"""


def test_the_preprocessor_sees_no_host_file(broker_factory):
    """R8: a world-readable host file is invisible to a tenant's preprocessor (its view holds
    the compilers and their headers, nothing else), while the CUDA headers are there."""
    b = broker_factory()
    fd, probe = tempfile.mkstemp(prefix="kubecash-probe-", dir="/tmp")
    os.close(fd)
    os.chmod(probe, 0o644)
    try:
        with b.connect("alice") as s:
            d = s.device("cpu0")
            r = d.allocate(8)
            d.launch(d.load_module(HAS_INCLUDE.replace("{probe}", probe)).get_kernel("k"), (1,), (1,), [r])
            assert list(np.frombuffer(r.copy_to(), np.int32)) == [0, 1]
            # And a pragma that reads a file names nothing of the host either.
            def outcome(path: str) -> str:
                src = ('#define PASTE(a, b) a##b\n#define S(x) #x\n#define P(x) _Pragma(S(x))\n'
                       f'#define D PASTE(depend, ency)\nP(GCC D "{path}")\n__global__ void k() {{}}\n')
                try:
                    d.load_module(src)
                    return "loaded"
                except kc.KubecashError as e:
                    return type(e).__name__ + str(e).replace(path, "PATH")
            # The file there and a file that is not: the same answer, so it learns nothing.
            assert outcome(probe) == outcome(probe + "-absent")
    finally:
        os.unlink(probe)


def _victim(tmp_path) -> tuple[str, dict[str, tuple[int, int, int]]]:
    """A root-owned directory a tenant would like the broker to touch, and its files' state."""
    v = tmp_path / "victim"
    v.mkdir()
    os.chmod(v, 0o755)
    for name in ("cpu0-0123456789abcdef.staging", "cpu0.sock", "keep"):
        (v / name).write_text("precious")
        os.chmod(v / name, 0o600)
    return str(v), _state(str(v))


def _state(d: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name in [".", *os.listdir(d)]:
        st = os.lstat(os.path.join(d, name))
        out[name] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return out


def test_root_never_follows_a_symlink_a_tenant_put_in_its_directory(kernel_cache, tmp_path):
    """R2: shm/ replaced by a symlink to a root-owned directory. Neither the executor's start
    and exit, nor the broker's shutdown and next start, change or delete anything there."""
    victim, before = _victim(tmp_path)
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    tenants = {"alice": {"memory": "256MiB"}}
    try:
        with BrokerProcess(tenants, kernel_cache, runtime_dir=runtime) as b:
            tdir = os.path.join(runtime, "tenants", "alice")
            os.rename(os.path.join(tdir, "shm"), os.path.join(tdir, "shm-old"))
            os.symlink(victim, os.path.join(tdir, "shm"))
            with b.connect("alice") as s:
                d = s.device("cpu0")
                run_vadd(d, 100_000)              # staged copies: the executor's shm files
                d.allocate_host(4096).close()
            wait_for(lambda: "executor for cpu0 ended" in b.log(), 30, "the executor's exit")
            assert _state(victim) == before
            assert b.alive()
        assert _state(victim) == before            # the broker's shutdown clears its files
        with BrokerProcess(tenants, kernel_cache, runtime_dir=runtime) as b2:   # and takes it back
            assert _state(victim) == before
            shm = os.path.join(tdir, "shm")
            assert not os.path.islink(shm) and os.path.isdir(shm)
            with b2.connect("alice") as s:
                run_vadd(s.device("cpu0"))
            assert b2.alive()
        assert _state(victim) == before
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


# System calls that act on a file by name (the last argument pattern: a path string).
_BY_PATH = ("chmod", "fchmodat", "chown", "fchownat", "lchown", "unlink", "unlinkat", "rename",
            "renameat", "renameat2", "truncate", "utimensat", "link", "linkat", "symlink", "symlinkat")


def _tenant_path_calls(trace: str, tenants_root: str) -> list[str]:
    """strace lines where root changed or removed something by a path through a directory
    a tenant owns (its own directory or anything below: a name the tenant can redirect)."""
    bad = []
    for line in trace.splitlines():
        call = line.split("(", 1)[0].split()[-1] if "(" in line else ""
        if call not in _BY_PATH or tenants_root not in line:
            continue
        for quoted in line.split('"')[1::2]:
            if quoted.startswith(tenants_root + "/"):
                rel = quoted[len(tenants_root) + 1:].split("/")
                # Unlinking <name>/x removes the entry x, a symlink or not (libzmq does so
                # before it binds); through <name>/shm/x it could be anywhere. Nothing else
                # by path at all.
                if len(rel) >= (3 if call in ("unlink", "unlinkat") else 1):
                    bad.append(line)
    return bad


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_root_changes_nothing_inside_a_tenant_directory_by_path(kernel_cache, tmp_path):
    """R3 (and R2): every chmod, chown or unlink the broker makes in a tenant's directory
    goes through a descriptor of a directory it opened without following symlinks, so
    swapping a socket or shm/ for a symlink at the right moment cannot redirect it. Watched
    with strace across what touches those directories: a reload that adds a tenant (its
    directory and socket) and changes an owner, and an executor's start and exit."""
    with BrokerProcess({"alice": {"memory": "256MiB"}}, kernel_cache) as b:
        tenants_root = os.path.join(b.runtime_dir, "tenants")
        out = tmp_path / "trace"
        st = subprocess.Popen(["strace", "-qq", "-s", "4096", "-e", "trace=" + ",".join(_BY_PATH),
                               "-o", str(out), "-p", str(b.proc.pid)])
        try:
            wait_for(lambda: _status(b.proc.pid)["TracerPid"] != "0", 30, "strace to attach")
            with open(b.config_path, "a") as f:
                f.write(f'\n[tenants.carol]\nowner = "{NOBODY}:{NOBODY}"\nmemory = "64MiB"\n')
            with b.admin() as a:
                assert "carol" in a.call("reload")["added"]
            with b.connect("alice") as s:
                d = s.device("cpu0")
                run_vadd(d, 100_000)
                d.allocate_host(4096).close()
            wait_for(lambda: "executor for cpu0 ended" in b.log(), 30, "the executor's exit")
            time.sleep(0.5)
        finally:
            st.terminate()
            st.wait(10)
        trace = out.read_text()
        assert "carol" in os.listdir(tenants_root) and b.alive()
        assert _tenant_path_calls(trace, tenants_root) == [], trace[-4000:]


def test_uids_are_allocated_per_tenant_and_stable():
    from kubecash.broker.server.tenants import allocate_uid
    a = allocate_uid("alice", 61184, 65519, set())
    assert a == allocate_uid("alice", 61184, 65519, set()) and 61184 <= a <= 65519
    assert allocate_uid("alice", 61184, 65519, {a}) != a
    assert allocate_uid("x" + secrets.token_hex(4), 100, 100, set()) == 100
    from kubecash.broker.config import ConfigError
    with pytest.raises(ConfigError, match="no uid left for tenant 'b'"):
        allocate_uid("b", 100, 100, {100})


def test_a_flood_of_files_in_a_tenant_directory_does_not_stall_the_broker(kernel_cache):
    """What a tenant (its container, or code in its executor) leaves in its shm directory is
    cleared off the broker's main loop: 300,000 files named like its executor's own stalled
    the loop for seconds, long enough for another tenant's session to expire unheard. (A
    directory the broker makes has room for 16384 files, test_tenant_fs.py; this one was
    made before it, as by an earlier broker, and has no file system of its own.)"""
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "kc-test", runtime], check=True)
    os.makedirs(os.path.join(runtime, "tenants", "alice"))
    try:
        with BrokerProcess({"alice": {}, "bob": {}}, kernel_cache, runtime_dir=runtime) as b, \
                b.connect("bob") as bob, b.connect("alice") as alice:
            alice.device("cpu0").allocate(16)
            pid = alice.status()["devices"]["cpu0"]["pid"]
            shm = os.path.join(runtime, "tenants", "alice", "shm")
            fd = os.open(shm, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i in range(300_000):
                    os.close(os.open(f"cpu0-{pid}-{i:07d}.junk", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            finally:
                os.close(fd)
            d = bob.device("cpu0")
            d.allocate(16)
            alice.close()                           # her executor ends: its files go
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:        # bob is heard throughout (timeout 1.5 s)
                d.mem_info()
                time.sleep(0.05)
            deadline = time.monotonic() + 120
            while any(True for _ in os.scandir(shm)):
                assert time.monotonic() < deadline, "alice's files were not removed"
                time.sleep(0.5)
            assert d.allocate(16).size == 16
            assert b.alive()
    finally:
        subprocess.run(["umount", "-l", runtime], check=False)
        shutil.rmtree(runtime, ignore_errors=True)
