"""A tenant's directory belongs to the uid its containers run as: they reach their sockets and
shared memory, and nobody else does (root aside)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
from conftest import GPU_COUNT
from kernels import VECADD

NOBODY = 65534

CLIENT = textwrap.dedent(f"""
    import os, sys, kubecash.client as kc
    # Become the container's uid once the interpreter is loaded (it lives under /root here).
    uid = int(sys.argv[1])
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    try:
        s = kc.connect(timeout=3)
    except kc.KubecashError as e:
        print("refused:", e); sys.exit(3)
    with s:
        d = s.device(sys.argv[2])
        n = 100_000                                     # > the inline limit: staged via shm
        a = d.allocate(4 * n)
        a.copy_from(bytes(range(256)) * (4 * n // 256) + bytes(4 * n % 256))
        h = d.allocate_host(4096)                       # a mapped shared-memory file
        h.view[:4] = b"abcd"
        a.copy_from(h)
        k = d.load_module({VECADD!r}).get_kernel("vadd")
        d.launch(k, (1,), (32,), [a, a, a, 32])
        d.synchronize()
        assert bytes(a.copy_to(bytearray(4)))  # round trip works
        print("ok")
""")


def run_as(uid: int, broker, tenant: str, device: str = "cpu0") -> subprocess.CompletedProcess:
    env = dict(broker.env(tenant), HOME="/tmp")
    return subprocess.run([sys.executable, "-c", CLIENT, str(uid), device], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_tenant_directory_is_owned_by_its_containers_uid(broker_factory):
    b = broker_factory({"web": {"owner": f"{NOBODY}:{NOBODY}"}, "ops": {}})
    d = os.path.join(b.runtime_dir, "tenants", "web")
    st = os.stat(d)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o700)
    p = run_as(NOBODY, b, "web")
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    # The same uid cannot reach a tenant it does not own (root-only here).
    p = run_as(NOBODY, b, "ops")
    assert p.returncode == 3 and "refused" in p.stdout, (p.stdout, p.stderr)
    # A tenant with no owner: its executors' own allocated uid ([broker] executor_uid_min..max).
    ops = os.stat(os.path.join(b.runtime_dir, "tenants", "ops"))
    assert 61184 <= ops.st_uid <= 65519 and stat.S_IMODE(ops.st_mode) == 0o700


@pytest.mark.gpu
@pytest.mark.skipif(GPU_COUNT == 0, reason="no NVIDIA GPU here (NVML finds none)")
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_a_gpu_tenants_containers_map_the_files_its_root_executor_makes(broker_factory):
    """A GPU executor stays root (unconfined, the driver's view): the staging segment and host
    memory it makes in shm/ are given to the tenant's uid, or its containers could not map them."""
    b = broker_factory({"web": {"owner": f"{NOBODY}:{NOBODY}"}})
    p = run_as(NOBODY, b, "web", "gpu0")
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_owner_is_validated(tmp_path):
    from kubecash.broker import config as cfg
    unlisted = {"broker": {"unlisted_owners": True}}    # uid 1000 need not exist here
    assert cfg.parse({**unlisted, "tenants": {"a": {"owner": "1000"}}}).tenants["a"].owner == (1000, 1000)
    assert cfg.parse({"tenants": {"a": {"owner": "nobody"}}}).tenants["a"].owner[0] == NOBODY
    with pytest.raises(cfg.ConfigError, match="tenant 'a', field 'owner': no such user"):
        cfg.parse({"tenants": {"a": {"owner": "no-such-user-here"}}})
    with pytest.raises(cfg.ConfigError, match="field 'owner'"):
        cfg.parse({"tenants": {"a": {"owner": True}}})


def test_tenants_sharing_an_owner_are_warned_about(broker_factory):
    """One uid for two tenants: their containers reach each other's directories; the
    operator hears it at start (and at every reload)."""
    b = broker_factory({"web": {"owner": "1000"}, "api": {"owner": "1000"}, "ops": {}}, unlisted_owners=True)
    assert "tenants api, web share owner uid 1000" in b.log()
