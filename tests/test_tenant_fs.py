"""Each tenant directory a root broker makes is a file system of its own, sized to the
tenant's quota (#13: "each tenant's use of the runtime filesystem is bounded"): what a
tenant's containers, or code in its executor, write there fills its own space, never the
runtime file system other tenants' memory comes from."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import BrokerProcess, wait_for
from kernels import run_vadd

import kubecash.client as kc
from kubecash.broker import confine
from kubecash.client import protocol as P
from kubecash.client.errors import E

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a broker that is not root mounts nothing")
MiB = 1 << 20
EXTRA = 64 * MiB                     # what a tenant's file system holds beyond its memory quota


def _size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(directory: str, cap: int) -> int:
    """Write junk into `directory` until the file system is full (or `cap` bytes: on a
    shared disk the test must stop by itself); how much went in."""
    written = 0
    with open(os.path.join(directory, "junk"), "wb") as f:
        try:
            while written < cap:
                f.write(b"\xa5" * MiB)
                f.flush()
                written += MiB
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return written


def test_a_tenant_directory_is_a_file_system_sized_to_its_quota(broker_factory):
    """alice's container writes until it cannot: it stops at her quota plus 64 MiB, in a
    file system of her own; the runtime file system and bob do not notice; her own next
    host allocation is a clean OUT_OF_MEMORY; a quota change resizes it live."""
    b = broker_factory({"alice": {"memory": "64MiB"}, "bob": {"memory": "64MiB"}})
    alice_dir, bob_dir = (os.path.join(b.runtime_dir, "tenants", n) for n in ("alice", "bob"))
    for d in (alice_dir, bob_dir):
        assert confine.is_tenant_fs(d) and _size(d) == 64 * MiB + EXTRA, d
        assert os.stat(d).st_dev != os.stat(b.runtime_dir).st_dev
    runtime_free = _free(b.runtime_dir)
    with b.connect("alice") as alice, b.connect("bob") as bob:
        a, bd = alice.device("cpu0"), bob.device("cpu0")
        run_vadd(a, 100_000)                         # staging, in her file system
        written = _fill(alice_dir, 512 * MiB)
        assert EXTRA // 2 < written <= 64 * MiB + EXTRA
        with b.admin() as adm:                       # brokerctl status shows it
            use = adm.call("status")["tenants"]["alice"]["directory"]
        assert use["own_file_system"] and use["bytes_max"] == 64 * MiB + EXTRA
        assert written <= use["bytes_used"] <= use["bytes_max"] and use["files_max"] == confine.TENANT_FS_INODES
        # what she wrote is in her file system, not the runtime's (whose free space other
        # processes move too: only a drop near what she wrote would be hers)
        assert os.stat(os.path.join(alice_dir, "junk")).st_dev == os.stat(alice_dir).st_dev
        assert _free(b.runtime_dir) > runtime_free - written // 2, "the runtime file system filled up"
        with pytest.raises(kc.OutOfMemoryError, match="file system holding the tenant's directory is full"):
            a.allocate_host(MiB)
        with bd.allocate_host(8 * MiB) as h:         # bob's room is his own
            h.view[:] = b"\x01" * (8 * MiB)
        run_vadd(bd)
        # Files, not only bytes, are bounded: 16384 of them at most.
        made = 0
        fd = os.open(alice_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.unlink("junk", dir_fd=fd)
            with pytest.raises(OSError) as e:
                while made < 100_000:
                    os.close(os.open(f"f{made}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
                    made += 1
            assert e.value.errno == errno.ENOSPC and made <= confine.TENANT_FS_INODES
            for i in range(made):
                os.unlink(f"f{i}", dir_fd=fd)
        finally:
            os.close(fd)
        a.allocate_host(MiB).close()                 # room again
        with b.admin() as adm:
            adm.call("set_quota", tenant="alice", memory=256 * MiB)
        assert _size(alice_dir) == 256 * MiB + EXTRA
        assert _size(bob_dir) == 64 * MiB + EXTRA
    assert b.alive()


@contextlib.contextmanager
def _inodes_taken(d: str):
    """Every inode of the tenant file system at `d` taken by empty files, until the block ends."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    made = 0
    try:
        with pytest.raises(OSError):
            while made < 100_000:
                os.close(os.open(f"f{made}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
                made += 1
        yield
    finally:
        for i in range(made):
            os.unlink(f"f{i}", dir_fd=fd)
        os.close(fd)


def test_an_executor_that_cannot_start_in_a_full_directory_says_why(broker_factory):
    """With every inode of her directory taken, alice's executor cannot make its socket:
    her session hears an OUT_OF_MEMORY naming that, not "exited with status 1"; with room
    again, her next session works, and bob never noticed."""
    b = broker_factory({"alice": {"memory": "64MiB"}, "bob": {"memory": "64MiB"}})
    d = os.path.join(b.runtime_dir, "tenants", "alice")
    with _inodes_taken(d):
        with b.connect("alice") as s:
            with pytest.raises(kc.OutOfMemoryError, match="could not start: cannot make the executor's "
                               "socket in the tenant's directory: No space left on device"):
                s.device("cpu0").allocate(16)
        with b.connect("bob") as s:
            run_vadd(s.device("cpu0"))
    with b.connect("alice") as s:
        run_vadd(s.device("cpu0"))
    assert b.alive()


def test_every_open_of_an_executor_that_cannot_start_is_answered(broker_factory, raw_socket):
    """An open asked again before the executor was ready waits with the first: when the
    executor cannot start (a full directory here), both hear why, not only the first."""
    b = broker_factory({"alice": {"memory": "64MiB"}})
    d = os.path.join(b.runtime_dir, "tenants", "alice")
    with _inodes_taken(d):
        sock = raw_socket(b.address("alice"))
        sock.send(P.pack({"v": 1, "id": 1, "op": "hello"}))
        token = P.unpack(sock.recv())["session"]
        for rid in (2, 3):
            sock.send(P.pack({"v": 1, "id": rid, "op": "open_device", "session": token, "device": "cpu0"}))
        replies = {}
        while len(replies) < 2:
            r = P.unpack(sock.recv())          # raw_socket's receive bound: zmq.Again if none
            if "event" not in r:               # executor_died comes too
                replies[r["id"]] = r
        assert sorted(replies) == [2, 3]
        for r in replies.values():
            assert r["ok"] is False and r["code"] == int(E.CUDA_ERROR_OUT_OF_MEMORY), r
            assert "could not start" in r["error"], r
    assert b.alive()


def test_the_file_system_outlives_a_restart_and_goes_with_its_tenant(kernel_cache):
    """Containers keep the directory they bind-mounted across broker restarts, so a
    restarted broker keeps (and resizes) the file system it finds; a tenant no longer
    configured loses it at the next start. A directory the broker did not make (an earlier
    broker's) keeps what it is, and the log says it is not bounded."""
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    os.makedirs(os.path.join(runtime, "tenants", "old"))
    d = os.path.join(runtime, "tenants", "alice")
    try:
        with BrokerProcess({"alice": {"memory": "64MiB"}, "old": {}}, kernel_cache, runtime_dir=runtime) as b:
            assert confine.is_tenant_fs(d)
            assert not confine.is_tenant_fs(os.path.join(runtime, "tenants", "old"))
            assert "tenant 'old': its directory was made by an earlier broker" in b.log()
            dev = os.stat(d).st_dev
            with open(os.path.join(d, "mine"), "w") as f:      # the container's own file
                f.write("kept")
        assert confine.is_tenant_fs(d), "the broker's exit took the file system away"
        with BrokerProcess({"alice": {"memory": "128MiB"}, "old": {}}, kernel_cache, runtime_dir=runtime) as b:
            assert os.stat(d).st_dev == dev and _size(d) == 128 * MiB + EXTRA
            assert open(os.path.join(d, "mine")).read() == "kept"
            with b.connect("alice") as s:
                run_vadd(s.device("cpu0"))
        with BrokerProcess({"bob": {}}, kernel_cache, runtime_dir=runtime) as b:
            assert not os.path.exists(d) and confine.tenant_fs_mounts(runtime) == {
                os.path.realpath(os.path.join(runtime, "tenants", "bob"))}
            assert b.alive()
    finally:
        confine.unmount_tenant_fs_under(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("propagation", ["slave", "private"])
def test_a_broker_in_a_mount_namespace_of_its_own_mounts_where_containers_are_made(kernel_cache, propagation):
    """Under systemd (ProtectSystem= and the like) the broker has a mount namespace of its
    own, a slave of the host's, where containers are made: a mount made there would not
    be theirs. So it mounts in [broker] mount_namespace (the host's) and uses it once it
    shows in its own. Here this test's namespace is the host's and the broker runs under
    `unshare --mount --propagation slave`. With no propagation at all (private) the mount
    cannot be seen by both: the broker says so, and serves from a plain directory."""
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    # A shared mount, as systemd makes every mount of the host
    subprocess.run(["mount", "--bind", runtime, runtime], check=True)
    subprocess.run(["mount", "--make-shared", runtime], check=True)
    try:
        with BrokerProcess({"alice": {"memory": "64MiB"}}, kernel_cache, runtime_dir=runtime,
                           mount_namespace=f"/proc/{os.getpid()}/ns/mnt",
                           command_prefix=("unshare", "--mount", "--propagation", propagation)) as b:
            assert os.readlink(f"/proc/{b.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            d = os.path.join(runtime, "tenants", "alice")
            if propagation == "slave":
                assert confine.is_tenant_fs(d) and _size(d) == 64 * MiB + EXTRA
                assert "no file system of its own" not in b.log()
            else:
                assert not confine.is_tenant_fs(d)
                wait_for(lambda: "no file system of its own for its directory" in b.log()
                         and "does not show in the broker's own mount namespace" in b.log(), 10, "the warning")
            with b.connect("alice") as s:               # a client here, as in a container
                dev = s.device("cpu0")
                run_vadd(dev)
                with dev.allocate_host(MiB) as h:
                    h.view[:4] = b"seen"
            assert b.alive()
    finally:
        subprocess.run(["umount", "-l", runtime], check=False)
        shutil.rmtree(runtime, ignore_errors=True)


def _unreadable_init_namespace() -> bool:
    try:
        os.stat("/proc/1/ns/mnt")
        return False
    except PermissionError:
        return True


@pytest.mark.parametrize("namespace, said", [
    pytest.param("/proc/1/ns/mnt", "cannot read mount namespace /proc/1/ns/mnt ([broker] mount_namespace)",
                 marks=pytest.mark.skipif(not _unreadable_init_namespace(),
                                          reason="/proc/1/ns/mnt is readable here")),
    ("", None)])
def test_where_the_namespace_cannot_be_read_nothing_is_mounted(broker_factory, namespace, said):
    """A mount made where containers are not would hide every socket in it from them, so a
    mount_namespace the broker cannot read (pid 1's, in some containers) mounts nothing and
    says so, as "" (none) does; the tenant is served from a plain directory either way."""
    b = broker_factory({"alice": {"memory": "64MiB"}}, mount_namespace=namespace)
    d = os.path.join(b.runtime_dir, "tenants", "alice")
    assert not confine.is_tenant_fs(d) and confine.tenant_fs_mounts(b.runtime_dir) == set()
    assert (said in b.log()) if said else ("no file system of its own" not in b.log())
    with b.admin() as adm:
        assert adm.call("status")["tenants"]["alice"]["directory"] == {"own_file_system": False}
    with b.connect("alice") as s:
        run_vadd(s.device("cpu0"))


def _fill_inodes(d: str) -> int:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    made = 0
    try:
        while made < 100_000:
            os.close(os.open(f"junk{made}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            made += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return made


def test_a_full_tenant_directory_keeps_only_that_tenant_out(kernel_cache):
    """alice's container takes every inode of her directory while the broker is down: the
    next broker starts anyway and serves bob, saying why alice is not served; a reload that
    adds carol and changes the quantum goes through, telling alice's reason; once alice has
    room again, the next reload serves her. (The broker died at start, and every reload
    failed half-applied, with ENOSPC.)"""
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    d = os.path.join(runtime, "tenants", "alice")
    tenants = {"alice": {"memory": "64MiB"}, "bob": {"memory": "64MiB"}}
    try:
        with BrokerProcess(tenants, kernel_cache, runtime_dir=runtime):
            pass
        made = _fill_inodes(d)
        with BrokerProcess(tenants, kernel_cache, runtime_dir=runtime) as b:
            assert "tenant 'alice' is not served: cannot set up its directory" in b.log()
            assert "No space left on device" in b.log()
            with b.connect("bob") as s:
                run_vadd(s.device("cpu0"))
            with open(b.config_path, "a") as f:
                f.write('\n[tenants.carol]\nmemory = "64MiB"\n')
            with open(b.config_path) as f:
                text = f.read().replace("[broker]\n", "[broker]\nquantum_ms = 7.0\n", 1)
            with open(b.config_path, "w") as f:
                f.write(text)
            with b.admin() as adm:
                r = adm.call("reload")
                assert r["added"] == ["carol"], r
                assert any("tenant 'alice' is not served" in w for w in r["warnings"]), r
                st = adm.call("status")
                assert sorted(st["tenants"]) == ["bob", "carol"] and st["quantum_ms"] == 7.0
            with b.connect("carol") as s:
                run_vadd(s.device("cpu0"))
            for i in range(made):
                os.unlink(os.path.join(d, f"junk{i}"))
            with b.admin() as adm:
                r = adm.call("reload")
                assert r["added"] == ["alice"] and r["warnings"] == [], r
            with b.connect("alice") as s:
                run_vadd(s.device("cpu0"))
            assert b.alive()
    finally:
        confine.unmount_tenant_fs_under(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_shrink_below_what_the_directory_holds_is_reported(broker_factory):
    """A quota cut below what alice's directory holds cannot shrink its file system: the
    set_quota reply (and brokerctl) says so, instead of a quiet success."""
    b = broker_factory({"alice": {"memory": "64MiB"}})
    d = os.path.join(b.runtime_dir, "tenants", "alice")
    with open(os.path.join(d, "junk"), "wb") as f:
        f.write(b"\1" * (100 * MiB))
    with b.admin() as adm:
        r = adm.call("set_quota", tenant="alice", memory=16 * MiB)
    assert _size(d) == 64 * MiB + EXTRA
    assert len(r["warnings"]) == 1 and f"keeps {64 * MiB + EXTRA} bytes, not {16 * MiB + EXTRA}" in r["warnings"][0], r
    os.unlink(os.path.join(d, "junk"))
    with b.admin() as adm:
        assert adm.call("set_quota", tenant="alice", memory=16 * MiB)["warnings"] == []
    assert _size(d) == 16 * MiB + EXTRA


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_the_mount_helper_acts_only_on_the_directory_the_broker_sees(kernel_cache):
    """The broker's runtime directory is, in its own namespace, another directory than the
    one at that path where containers are made (a bind mount there): the helper that mounts
    in the host's namespace finds a different directory at the path, and mounts nothing on
    it. (It mounted a tenant-owned tmpfs over whatever was there.)"""
    host_view = tempfile.mkdtemp(prefix="kc-", dir="/tmp")     # what the path is out here
    broker_view = tempfile.mkdtemp(prefix="kc-", dir="/tmp")   # what the broker has there
    victim = os.path.join(host_view, "tenants", "alice")
    os.makedirs(victim)
    open(os.path.join(victim, "precious"), "w").close()
    subprocess.run(["mount", "--bind", host_view, host_view], check=True)
    subprocess.run(["mount", "--make-shared", host_view], check=True)
    try:
        with BrokerProcess({"alice": {"memory": "64MiB"}, "bob": {}}, kernel_cache, runtime_dir=host_view,
                           mount_namespace=f"/proc/{os.getpid()}/ns/mnt",
                           admin_socket=os.path.join(broker_view, "admin.sock"),   # seen from both
                           command_prefix=("unshare", "--mount", "--propagation", "slave", "sh", "-c",
                                           f"cp {host_view}/quota.toml {broker_view}/ && "
                                           f'mount --bind {broker_view} {host_view} && exec "$@"', "sh")) as b:
            wait_for(lambda: "is another directory here than the broker's" in b.log(), 10, "the refusal")
            assert confine.tenant_fs_mounts(host_view) == set() and confine.tenant_fs_mounts(broker_view) == set()
            assert os.listdir(victim) == ["precious"]
            assert b.alive()
    finally:
        subprocess.run(["umount", "-l", host_view], check=False)
        shutil.rmtree(host_view, ignore_errors=True)
        shutil.rmtree(broker_view, ignore_errors=True)
