"""Dynamic tenants (brokerctl tenant, the admin socket, the state file) on a real broker."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import BrokerProcess
from kernels import run_vadd

import kubecash.client as kc
from kubecash.broker import config as cfg
from kubecash.broker import confine, state
from kubecash.broker.local import toml_dumps

BROKERCTL = os.path.join(os.path.dirname(sys.executable), "brokerctl")
MiB = 1 << 20


def ctl(b, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([BROKERCTL, "--runtime-dir", b.runtime_dir, *args],
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode == 0) == ok, (p.stdout, p.stderr)
    return p


def state_file(b) -> str:
    return state.path_in(os.path.join(b.runtime_dir, "state"))


def served(admin) -> dict:
    return admin.call("status")["tenants"]


def test_add_list_change_remove_through_brokerctl(broker_factory):
    b = broker_factory({"alice": {"memory": "64MiB"}})
    r = json.loads(ctl(b, "tenant", "add", "carol", "--memory", "96MiB", "--weight", "300",
                       "--class", "latency", "--device-quota", "cpu0:limit=0.5", "--json").stdout)
    assert r == {"tenant": "carol", "created": True, "changed": True, "served": True, "warnings": []}
    listed = json.loads(ctl(b, "tenant", "list", "--json").stdout)
    assert listed["tenants"]["alice"]["source"] == "file"
    assert listed["tenants"]["carol"] == {"source": "dynamic", "served": True, "table": {
        "memory": 96 * MiB, "weight": 300, "class": "latency", "device": {"cpu0": {"limit": 0.5}}}}
    assert "carol         dynamic  yes" in ctl(b, "tenant", "list").stdout
    # A client of the new tenant runs kernels within its quota, and no further.
    with b.connect("carol") as s:
        d = s.device("cpu0")
        assert d.total_memory == 96 * MiB and d.properties["class"] == "latency"
        run_vadd(d)
        with pytest.raises(kc.OutOfMemoryError):
            d.allocate(97 * MiB)
    # The same definition again changes nothing; another one needs --replace.
    assert "unchanged carol" in ctl(b, "tenant", "add", "carol", "--memory", "96MiB", "--weight", "300",
                                    "--class", "latency", "--device-quota", "cpu0:limit=0.5").stdout
    p = ctl(b, "tenant", "add", "carol", "--memory", "48MiB", ok=False)
    assert "exists with another definition" in p.stderr and "--replace" in p.stderr
    assert "changed carol" in ctl(b, "tenant", "add", "carol", "--memory", "48MiB", "--replace").stdout
    with b.admin() as admin:
        q = served(admin)["carol"]["devices"]["cpu0"]
        assert (q["memory_limit"], q["weight"], q["limit"], q["class"]) == (48 * MiB, 100, None, "batch")
        assert served(admin)["carol"]["source"] == "dynamic"
    with open(state_file(b)) as f:
        doc = json.load(f)
    assert doc == {"format": "kubecash.io/dynamic-tenants", "version": 1,
                   "tenants": {"carol": {"memory": 48 * MiB}}}
    assert "removed carol" in ctl(b, "tenant", "remove", "carol").stdout
    with b.admin() as admin:
        assert set(served(admin)) == {"alice"}
    carol_dir = os.path.join(b.runtime_dir, "tenants", "carol")
    assert not os.path.exists(carol_dir) and os.path.realpath(carol_dir) not in confine.tenant_fs_mounts(b.runtime_dir)
    assert json.load(open(state_file(b)))["tenants"] == {}
    p = ctl(b, "tenant", "remove", "carol", ok=False)
    assert "no dynamic tenant 'carol'" in p.stderr


def test_the_admin_socket_adds_changes_and_removes_and_a_removed_tenants_session_ends(broker_factory):
    b = broker_factory({"alice": {}})
    with b.admin() as admin:
        r = admin.call("tenant_add", tenant="dave", table={"memory": "64MiB", "limit": 0.25})
        assert r["created"] and r["served"]
        with b.connect("dave") as s:
            d = s.device("cpu0")
            run_vadd(d)
            # A live change through brokerctl set is kept in the state file, as the tenant is.
            admin.call("set_quota", tenant="dave", weight=700)
            assert json.load(open(state_file(b)))["tenants"]["dave"] == {
                "memory": 64 * MiB, "limit": 0.25, "weight": 700}
            assert served(admin)["dave"]["devices"]["cpu0"]["weight"] == 700
            assert "dave (1 sessions, dynamic)" in ctl(b, "tenants").stdout
            # What no tenant table can say is refused, and nothing changes.
            with pytest.raises(kc.InvalidValueError, match="cannot be kept in the state file.*'limit'"):
                admin.call("set_quota", tenant="dave", device="cpu0", limit=0)
            assert served(admin)["dave"]["devices"]["cpu0"]["limit"] == 0.25
            r = admin.call("tenant_remove", tenant="dave")
            assert r == {"tenant": "dave", "sessions_ended": 1}
            with pytest.raises(kc.KubecashError, match="removed by the operator|ended"):
                for _ in range(50):
                    d.mem_info()
                    time.sleep(0.1)
        assert set(served(admin)) == {"alice"}
        with pytest.raises(kc.KubecashError):
            kc.connect(b.address("dave"), timeout=1)
        # The broker and its other tenants are unaffected.
        with b.connect("alice") as s:
            assert s.device("cpu0").allocate(16).size == 16


@pytest.mark.parametrize("table, what", [
    ({"memory": "1GiB", "colour": "red"}, "field 'colour': unknown field"),
    ({"memory": -1}, "field 'memory': a size cannot be negative"),
    ({"memory": "-5MiB"}, "field 'memory'"),
    ({"limit": 2}, "field 'limit': must be from 0.0001 to 1 (the number of devices)"),
    ({"weight": 0}, "field 'weight'"),
    ({"device": {"cpu0": {"limit": 1.5}}}, "device 'cpu0', field 'limit'"),
    ({"devices": "cpu0"}, "field 'devices'"),
    ({"owner": "no-such-user-here"}, "field 'owner'"),
])
def test_bad_tables_are_refused_naming_the_field(broker, table, what):
    with broker.admin() as admin:
        with pytest.raises(kc.InvalidValueError, match="tenant 'eve'") as e:
            admin.call("tenant_add", tenant="eve", table=table)
        assert what in str(e.value)
        assert "eve" not in served(admin)
    assert not os.path.exists(state_file(broker))       # nothing was written
    assert broker.alive()


def test_bad_names_and_cli_input_are_refused(broker):
    p = ctl(broker, "tenant", "add", "a/b", ok=False)
    assert "tenant 'a/b': name must be 1-64 characters" in p.stderr
    p = ctl(broker, "tenant", "add", "..", ok=False)
    assert "not . or .." in p.stderr
    p = ctl(broker, "tenant", "add", "eve", "--memory", "-1", ok=False)
    assert "field 'memory'" in p.stderr
    p = ctl(broker, "tenant", "add", "eve", "--limit", "3", ok=False)
    assert "field 'limit'" in p.stderr and "the number of devices" in p.stderr
    p = ctl(broker, "tenant", "add", "eve", "--device-quota", "cpu0:memry=1GiB", ok=False)
    assert "device 'cpu0', field 'memry': unknown field" in p.stderr
    p = ctl(broker, "tenant", "add", "eve", "--device-quota", "nonsense", ok=False)
    assert "DEVICE:FIELD=VALUE" in p.stderr
    with broker.admin() as admin:
        assert set(served(admin)) == {"alice", "bob"}
    with broker.connect("alice") as s:
        assert s.device("cpu0").allocate(16).size == 16


def test_names_never_collide_either_way(broker_factory):
    b = broker_factory({"alice": {"weight": 200}})
    with b.admin() as admin:
        with pytest.raises(kc.InvalidValueError, match="'alice' is defined in the quota file"):
            admin.call("tenant_add", tenant="alice", table={})
        p = ctl(b, "tenant", "remove", "alice", ok=False)
        assert "remove it there and reload" in p.stderr
        admin.call("tenant_add", tenant="carol", table={"weight": 50})
        # A reload whose file now names carol is refused, naming her; nothing changes.
        with open(b.config_path, "w") as f:
            f.write(toml_dumps({"runtime_dir": b.runtime_dir, "state_dir": os.path.join(b.runtime_dir, "state"),
                                "heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5},
                               {"alice": {"weight": 300}, "carol": {"weight": 10}}))
        with pytest.raises(kc.InvalidValueError) as e:
            admin.call("reload")
        assert "reload refused" in str(e.value) and "tenant 'carol' is a dynamic tenant" in str(e.value)
        st = served(admin)
        assert st["alice"]["devices"]["cpu0"]["weight"] == 200
        assert st["carol"]["devices"]["cpu0"]["weight"] == 50 and st["carol"]["source"] == "dynamic"
        # A reload that does not collide keeps the dynamic tenant as it is.
        with open(b.config_path, "w") as f:
            f.write(toml_dumps({"runtime_dir": b.runtime_dir, "state_dir": os.path.join(b.runtime_dir, "state"),
                                "heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5},
                               {"alice": {"weight": 300}}))
        r = admin.call("reload")
        assert r["removed"] == [] and "carol" in r["tenants"]
        st = served(admin)
        assert st["alice"]["devices"]["cpu0"]["weight"] == 300
        assert st["carol"]["devices"]["cpu0"]["weight"] == 50
    with b.connect("carol") as s:
        assert s.device("cpu0").allocate(16).size == 16


def test_a_restart_keeps_dynamic_tenants_and_their_directories(kernel_cache):
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    d = os.path.join(runtime, "tenants", "carol")
    try:
        with BrokerProcess({"alice": {}}, kernel_cache, runtime_dir=runtime) as b:
            with b.admin() as admin:
                admin.call("tenant_add", tenant="carol", table={"memory": "64MiB", "weight": 250})
                admin.call("tenant_add", tenant="gone", table={})
                admin.call("tenant_remove", tenant="gone")
            with open(os.path.join(d, "mine"), "w") as f:       # the container's own file
                f.write("kept")
            fs = confine.is_tenant_fs(d)
        with BrokerProcess({"alice": {}}, kernel_cache, runtime_dir=runtime) as b:
            with b.admin() as admin:
                st = admin.call("status")
                assert set(st["tenants"]) == {"alice", "carol"} and st["state"]["problem"] is None
                q = st["tenants"]["carol"]["devices"]["cpu0"]
                assert (q["memory_limit"], q["weight"]) == (64 * MiB, 250)
            assert open(os.path.join(d, "mine")).read() == "kept"
            assert confine.is_tenant_fs(d) == fs
            assert not os.path.exists(os.path.join(runtime, "tenants", "gone"))
            with b.connect("carol") as s:
                run_vadd(s.device("cpu0"))
    finally:
        confine.unmount_tenant_fs_under(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("content", [
    b'{"format": "kubecash.io/dynamic-tenants", "version": 1, "tenants": {"carol": {"memo',   # torn
    b'{"format": "kubecash.io/dynamic-tenants", "version": 1, "tenants": '
    b'{"carol": {"memory": "64MiB"}, "dave": {"weight": -3}}}',                               # one bad
    b'{"format": "kubecash.io/dynamic-tenants", "version": 9, "tenants": {}}',                  # newer
    b'{"format": "kubecash.io/dynamic-tenants", "version": 1, "tenants": {"alice": {}}}',       # collides
])
def test_an_unusable_state_file_is_set_aside_and_reported_and_the_broker_serves_on(kernel_cache, content):
    runtime = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    path = os.path.join(runtime, "state", "tenants.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    try:
        with BrokerProcess({"alice": {}}, kernel_cache, runtime_dir=runtime) as b:
            with b.admin() as admin:
                st = admin.call("status")
                assert set(st["tenants"]) == {"alice"}            # none of it applied
                problem = st["state"]["problem"]
                assert problem["set_aside"].startswith(path + ".bad-") and path in problem["error"]
            with open(problem["set_aside"], "rb") as f:
                assert f.read() == content                        # kept for the operator
            assert not os.path.exists(path)
            assert "state file is unusable" in b.log()
            assert "STATE FILE UNUSABLE" in ctl(b, "status").stdout
            with b.connect("alice") as s:
                assert s.device("cpu0").allocate(16).size == 16
            with b.admin() as admin:                              # a new state file starts afresh
                admin.call("tenant_add", tenant="carol", table={})
            assert set(json.load(open(path))["tenants"]) == {"carol"}
    finally:
        confine.unmount_tenant_fs_under(runtime)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_state_file_that_cannot_be_written_changes_nothing(broker_factory, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    b = broker_factory({"alice": {}}, state_dir=str(blocker / "state"))
    with b.admin() as admin:
        with pytest.raises(kc.CudaError, match="cannot write the state file .*nothing changed"):
            admin.call("tenant_add", tenant="carol", table={})
        assert "carol" not in served(admin)
        assert not os.path.exists(os.path.join(b.runtime_dir, "tenants", "carol"))


def test_tenant_table_round_trips_through_the_quota_file_rules():
    data = {"broker": {"mount_namespace": ""}, "tenants": {"t": {
        "memory": "1GiB", "weight": 7, "limit": 0.3, "class": "latency", "max_kernel_seconds": 2.5,
        "devices": ["cpu0", "gpu1"], "owner": "0:0",
        "device": {"gpu1": {"memory": "2GiB", "weight": 9}}}}}
    c = cfg.parse(data)
    t = c.tenants["t"]
    table = cfg.tenant_table(t)
    assert table["memory"] == 1 << 30 and table["owner"] == "0:0"
    assert table["device"] == {"gpu1": {"memory": 2 << 30, "weight": 9}}
    assert cfg.parse_tenant("x", "t", json.loads(json.dumps(table)), c.broker) == t
    assert cfg.tenant_table(cfg.parse_tenant("x", "u", {}, c.broker)) == {}


def test_the_state_file_is_replaced_whole(tmp_path):
    path = str(tmp_path / "s" / "tenants.json")
    settings = cfg.BrokerSettings(mount_namespace="")
    t = {"a": cfg.parse_tenant("x", "a", {"weight": 5}, settings)}
    state.save(path, t)
    assert state.load(path, settings, 1) == t
    assert os.stat(path).st_mode & 0o777 == 0o600
    state.save(path, {})
    assert state.load(path, settings, 1) == {}
    assert os.listdir(tmp_path / "s") == ["tenants.json"]       # no temporary file left
