"""One tenant trying another's device pointers, handles, sockets and shared-memory names:
all refused, and the victim's data never shows up on the attacker's side."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time

import pytest
from conftest import BrokerProcess, run_client, wait_for
from kernels import VECADD

import kubecash.client as kc
from kubecash.client import protocol as P

SECRET = b"alice's secret!!" * 4
READER = r"""
extern "C" __global__ void peek(const unsigned char* src, unsigned char* dst, int n) {
    int i = threadIdx.x;
    if (i < n) dst[i] = src[i];
}
"""


def _raw_call(raw_socket, address: str, **msg) -> dict:
    sock = raw_socket(address)
    sock.send(P.pack({"v": 1, "id": 77, **msg}))
    r = P.unpack(sock.recv())
    assert r["id"] == 77
    return r


def test_sockets_and_tokens_of_another_tenant_are_refused(broker, raw_socket):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        a.device("cpu0").allocate(16)
        b.device("cpu0").allocate(16)
        alice_exec = f"ipc://{P.executor_socket_path(broker.runtime_dir, 'alice', 'cpu0')}"
        bob_exec = f"ipc://{P.executor_socket_path(broker.runtime_dir, 'bob', 'cpu0')}"
        # bob reaching alice's executor socket: with his own token, with forged ones
        for token in (b.token, secrets.token_bytes(16), b"\0" * 16, a.token[:8] + b.token[8:]):
            for op in ({"op": "mem_info"}, {"op": "mem_alloc", "size": 16}, {"op": "attach"}):
                r = _raw_call(raw_socket, alice_exec, session=token, **op)
                assert not r["ok"] and r["code"] == kc.CUresult.CUDA_ERROR_INVALID_CONTEXT, r
        # ... and alice's broker socket, with his token: not a session of this socket's tenant
        for op in ({"op": "status"}, {"op": "heartbeat"}, {"op": "open_device", "device": "cpu0"},
                   {"op": "close"}):
            r = _raw_call(raw_socket, broker.address("alice"), session=b.token, **op)
            assert not r["ok"] and r["code"] == kc.CUresult.CUDA_ERROR_INVALID_CONTEXT, r
        # alice's (stolen) token sent on bob's sockets is no better
        r = _raw_call(raw_socket, broker.address("bob"), op="status", session=a.token)
        assert r["code"] == kc.CUresult.CUDA_ERROR_INVALID_CONTEXT
        r = _raw_call(raw_socket, bob_exec, op="mem_info", session=a.token)
        assert r["code"] == kc.CUresult.CUDA_ERROR_INVALID_CONTEXT
        # nothing was created for anyone, and both sessions still work
        held = (32 << 20) + 4096           # staging and one page
        assert a.status()["devices"]["cpu0"]["memory_used"] in (0, held)
        assert a.device("cpu0").mem_info()[0] == (256 << 20) - held
        assert b.device("cpu0").mem_info()[0] == (256 << 20) - held


def test_device_pointers_of_another_tenant_are_refused(broker):
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        secret = da.allocate(len(SECRET))
        secret.copy_from(SECRET)
        host = da.allocate_host(4096)
        host.view[:len(SECRET)] = SECRET
        mine = db.allocate(len(SECRET))
        # (bob's own allocations may lie below alice's addresses: then "runs past the end")
        refused = "not in any allocation|runs past the end of its allocation"
        for ptr in (secret.ptr, secret.ptr + 8, host.ptr):
            with pytest.raises(kc.InvalidValueError, match=refused):
                db.request("memcpy_dtoh", src=ptr, size=8)
            with pytest.raises(kc.InvalidValueError, match=refused):
                db.request("memcpy_htod", dst=ptr, size=4, data=b"evil")
            with pytest.raises(kc.InvalidValueError, match=refused):
                db.request("memcpy_dtod", dst=mine.ptr, src=ptr, size=8)
            with pytest.raises(kc.InvalidValueError, match=refused):
                db.request("memset", dst=ptr, value=0, width=1, count=8)
            with pytest.raises(kc.InvalidValueError):
                db.request("host_mapped", ptr=ptr)
            with pytest.raises(kc.InvalidValueError):
                db.request("host_free", ptr=ptr)
        # A kernel of bob's given alice's address dereferences it in bob's own executor (a
        # separate process): it either faults there or reads bob's memory, never alice's.
        peek = db.load_module(READER).get_kernel("peek")
        db.launch(peek, (1,), (len(SECRET),), [secret.ptr, mine, len(SECRET)])
        try:
            db.synchronize()
            assert bytes(mine.copy_to()) != SECRET
        except kc.LaunchFailedError:
            pass
        # alice's data is intact
        assert bytes(secret.copy_to()) == SECRET
        assert bytes(host.view[:len(SECRET)]) == SECRET


def test_shared_memory_names_cannot_reach_another_tenant(broker, raw_socket, tmp_path):
    # No request names a file: segments are named by the executor (random, in the
    # tenant's own shm directory) and reached by offsets inside the session's own segment.
    path_like = {n for t in (P.BROKER_OPS, P.EXECUTOR_OPS) for f in t.values() for n in f
                 if "path" in n or "file" in n or n == "shm"}
    assert not path_like
    with broker.connect("alice") as a, broker.connect("bob") as b:
        da, db = a.device("cpu0"), b.device("cpu0")
        ha = da.allocate_host(4096)
        ha.view[:4] = b"mine"
        hb = db.allocate_host(4096)
        buf = db.allocate(4096)
        alice_shm = os.path.join(broker.runtime_dir, "tenants", "alice", "shm")
        bob_shm = os.path.join(broker.runtime_dir, "tenants", "bob", "shm")
        alice_names = set(os.listdir(alice_shm))
        # files the executor handed out are plain names inside the tenant's own directory
        assert all("/" not in n and n.startswith("cpu0-") for n in alice_names | set(os.listdir(bob_shm)))
        tok = b.token
        bob_exec = f"ipc://{P.executor_socket_path(broker.runtime_dir, 'bob', 'cpu0')}"
        for name in [*alice_names, "../../alice/shm/" + next(iter(alice_names), "x"),
                     "/etc/passwd", "../alice/shm"]:
            for field in ("path", "staging", "name_of_segment"):      # unknown fields
                r = _raw_call(raw_socket, bob_exec, op="memcpy_dtoh", session=tok, src=buf.ptr,
                              size=8, **{field: name})
                assert not r["ok"] and "unknown field" in r["error"], r
            r = _raw_call(raw_socket, broker.address("bob"), op="open_device", session=tok,
                          device=name[:64])
            assert not r["ok"] and r["code"] == kc.CUresult.CUDA_ERROR_INVALID_DEVICE
        # staged copies address bob's own segment by offset, never past its end
        for off, n in ((P.DEFAULT_STAGING_BYTES, 1), (P.DEFAULT_STAGING_BYTES - 4, 8), (1 << 40, 8)):
            with pytest.raises(kc.InvalidValueError, match="staging"):
                db.request("memcpy_dtoh", src=buf.ptr, size=n, offset=off)
        # a module cannot read a file either: includes and include paths are refused
        for src, opts in (('#include "../../alice/shm/x"\n__global__ void f(){}', []),
                          ('#include "/etc/passwd"\n', []),
                          ('extern "C" __global__ void f(int*p){}', ["-I" + alice_shm]),
                          ('extern "C" __global__ void f(int*p){}', ["-include", "/etc/passwd"])):
            with pytest.raises(kc.CudaError):
                db.load_module(src, options=opts)
        # A symlink planted in bob's shm directory, named like an executor's file and
        # pointing at alice's segment, is removed as a link when bob's executor ends: the
        # target (alice's file) is not followed.
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep")
        planted = f"cpu0-{b.status()['devices']['cpu0']['pid']}-planted.host"   # his executor's prefix
        os.symlink(victim, os.path.join(bob_shm, planted))
        hb.close()
        b.close()
        deadline = time.monotonic() + 15
        while os.path.lexists(os.path.join(bob_shm, planted)):
            assert time.monotonic() < deadline, "bob's executor files not cleaned"
            time.sleep(0.05)
        assert victim.read_bytes() == b"keep"
        assert bytes(ha.view[:4]) == b"mine"          # alice's mapping is untouched
        assert da.mem_info()[0] == (256 << 20) - (32 << 20) - 4096    # staging, one page


def test_executors_reach_the_broker_only_on_their_own_socketpairs(broker):
    """An executor runs tenant code. Its channel to the broker is a socketpair only it holds:
    no socket in the runtime directory to connect to and pose as another tenant's executor
    (the shared control socket this replaced let any process of the broker's uid that knew
    one secret say 'ready' for another executor's pid and receive its session tokens)."""
    with broker.connect("alice") as a, broker.connect("bob") as b:
        a.device("cpu0").allocate(16)
        b.device("cpu0").allocate(16)
        expected = {os.path.realpath(p) for p in (
            broker.admin_path, broker.socket_path("alice"), broker.socket_path("bob"),
            P.executor_socket_path(broker.runtime_dir, "alice", "cpu0"),
            P.executor_socket_path(broker.runtime_dir, "bob", "cpu0"))}
        found = set()
        for root, _dirs, files in os.walk(broker.runtime_dir):
            for f in files:
                path = os.path.realpath(os.path.join(root, f))
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.add(path)
        assert found == expected, f"unexpected sockets: {sorted(found - expected)}"
        for s in (a, b):   # and both executors' reports reach the broker
            wait_for(lambda s=s: s.status()["devices"]["cpu0"]["memory_used"] >= 16, 10,
                     f"{s.tenant}'s executor to report its memory in use")


def test_handles_of_another_session_or_tenant_are_refused(broker):
    with broker.connect("alice") as a, broker.connect("alice") as a2, broker.connect("bob") as b:
        da, da2, db = a.device("cpu0"), a2.device("cpu0"), b.device("cpu0")
        buf = da.allocate(4096)
        mod = da.load_module(VECADD)
        k = mod.get_kernel("vadd")
        s = da.create_stream()
        ev = da.create_event()
        for dev in (da2, db):
            with pytest.raises(kc.InvalidValueError, match="not in any allocation"):
                dev.request("memcpy_dtoh", src=buf.ptr, size=16)
            with pytest.raises(kc.InvalidValueError):
                dev.request("mem_free", ptr=buf.ptr)
            with pytest.raises(kc.InvalidHandleError):
                dev.request("get_function", module=mod.handle, name="vadd")
            with pytest.raises(kc.InvalidHandleError):
                dev.request("stream_sync", stream=s.handle)
            with pytest.raises(kc.InvalidHandleError):
                dev.request("event_query", event=ev.handle)
        # A launch with a foreign function handle fails at the next synchronization.
        db.submit("launch", function=k.handle, grid=[1, 1, 1], block=[1, 1, 1], shared=0,
                 stream=0, args=[b"\0" * 8] * 3 + [b"\0" * 4])
        with pytest.raises(kc.InvalidHandleError):
            db.synchronize()
        db.synchronize()                     # reported once, then the context is fine
        # Forged and freed handles.
        with pytest.raises(kc.InvalidValueError):
            da.request("memcpy_dtoh", src=buf.ptr + 4090, size=16)   # runs off the end
        buf.close()
        with pytest.raises(kc.InvalidValueError):
            da.request("memcpy_dtoh", src=buf.ptr, size=16)          # freed
        # bob's session token is unknown to alice's executor even on alice's socket.
        ch = a._devices["cpu0"]._ch
        with pytest.raises(kc.CudaError) as e:
            a._wait(ch, a._send(ch, "mem_info", {"session": b.token}))
        assert e.value.name == "CUDA_ERROR_INVALID_CONTEXT"
        assert da.mem_info()[1] == 256 << 20       # alice's session still works


# bob copies through his staging segment before and after alice fills the file system.
COPIER = """
    import sys, numpy as np, kubecash.client as kc
    with kc.connect() as s:
        d = s.device("cpu0")
        data = np.random.default_rng(5).integers(0, 255, 32 << 20, dtype=np.uint8)
        buf = d.allocate(data.nbytes)
        buf.copy_from(data[: 1 << 20])          # touches only the start of the segment
        print("ready", flush=True)
        sys.stdin.readline()
        buf.copy_from(data)                     # every page of it, now
        assert (buf.copy_to(np.empty_like(data)) == data).all()
        print("ok", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as the runtime directory")
def test_one_tenant_filling_the_runtime_file_system_crashes_no_one(kernel_cache):
    """R5: the staging segment and host memory are backed when made, so a full file system is
    an OUT_OF_MEMORY for whoever asks next, never a SIGBUS in another tenant's executor or
    client (bob's client died of one, and his executor ended with ILLEGAL_ADDRESS). Here
    alice's directory is a plain one (made before the broker: it gets no file system of its
    own, test_tenant_fs.py), so she fills the runtime file system itself."""
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "kc-test", runtime], check=True)
    os.makedirs(os.path.join(runtime, "tenants", "alice"))
    try:
        with BrokerProcess({"alice": {"memory": "256MiB"}, "bob": {"memory": "256MiB"}},
                           kernel_cache, runtime_dir=runtime) as b:
            p = run_client(COPIER, b.address("bob"), stdin=subprocess.PIPE)
            try:
                assert p.stdout.readline().strip() == "ready", p.stderr.read()
                # alice's container fills the file system its directory is on
                junk = os.path.join(runtime, "tenants", "alice", "junk")
                with open(junk, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                with b.connect("alice") as a:  # asking for more is a clean error, naming why
                    with pytest.raises(kc.OutOfMemoryError, match="file system holding the tenant's directory is full"):
                        a.device("cpu0").allocate_host(1 << 20)
                p.stdin.write("go\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "ok", p.stderr.read()
                assert p.wait(60) == 0
            finally:
                for f in (p.stdout, p.stderr, p.stdin):
                    f.close()
                p.kill()
            assert b.alive()
    finally:
        subprocess.run(["umount", "-l", runtime], check=False)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as the kernel cache")
def test_a_full_kernel_cache_is_a_clean_error_naming_it(tmp_path):
    """R5: a module load on a full disk was CUDA_ERROR_UNKNOWN "internal error: [Errno 28]"."""
    cache = str(tmp_path / "cache")
    os.mkdir(cache)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kc-cache", cache], check=True)
    try:
        with BrokerProcess({"alice": {"memory": "256MiB"}}, cache) as b:
            with open(os.path.join(cache, "junk"), "wb") as f:
                with pytest.raises(OSError):
                    while True:
                        f.write(b"\0" * (64 << 10))
                        f.flush()
            with b.connect("alice") as s:
                with pytest.raises(kc.OutOfMemoryError, match="module build.*No space left on device"):
                    s.device("cpu0").load_module(VECADD.replace("vadd", "vadd_full_disk"))
            assert b.alive()
    finally:
        subprocess.run(["umount", "-l", cache], check=False)
