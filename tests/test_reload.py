"""Config reload (SIGHUP and the admin request): atomic, and an invalid file changes nothing."""
from __future__ import annotations

import os
import signal
import time

import pytest

import kubecash.client as kc
from kubecash.broker.local import toml_dumps
from kubecash.client import protocol as P


def rewrite(broker, tenants: dict, **settings) -> None:
    base = {"runtime_dir": broker.runtime_dir, "heartbeat_interval_s": 0.25,
            "heartbeat_timeout_s": 1.5, "executor_threads": 2, **settings}
    with open(broker.config_path, "w") as f:
        f.write(toml_dumps(base, tenants))


def quota(admin, tenant):
    return admin.call("status")["tenants"][tenant]["devices"]["cpu0"]


def test_sighup_applies_added_removed_and_changed_tenants(broker_factory):
    b = broker_factory({"alice": {"memory": "256MiB"}, "bob": {"memory": "256MiB"}})
    with b.connect("alice") as a, b.connect("bob") as bob, b.admin() as admin:
        a.device("cpu0").allocate(4096)
        bob.device("cpu0").allocate(4096)
        rewrite(b, {"alice": {"memory": "48MiB", "weight": 300, "limit": 0.5},
                    "carol": {"class": "latency"}})
        os.kill(b.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "carol" not in admin.call("status")["tenants"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = admin.call("status")
        assert set(st["tenants"]) == {"alice", "carol"}
        q = st["tenants"]["alice"]["devices"]["cpu0"]
        assert (q["weight"], q["limit"], q["memory_limit"]) == (300, 0.5, 48 << 20)
        assert os.path.exists(b.socket_path("carol")) and not os.path.exists(b.socket_path("bob"))
        # The new memory quota applies live: alice holds 4 KiB and her 32 MiB staging
        # segment of her new 48 MiB.
        with pytest.raises(kc.OutOfMemoryError):
            a.device("cpu0").allocate(16 << 20)
        a.device("cpu0").allocate(4096)
        # bob's session ended cleanly, with a reason.
        with pytest.raises(kc.KubecashError, match="removed|ended|session"):
            for _ in range(50):
                bob.device("cpu0").mem_info()
                time.sleep(0.1)
        with b.connect("carol") as c:
            assert c.device("cpu0").properties["class"] == "latency"


def test_an_invalid_file_is_refused_and_the_running_configuration_stays(broker_factory):
    b = broker_factory({"alice": {"weight": 200}})
    with b.admin() as admin, b.connect("alice") as a:
        with open(b.config_path, "a") as f:
            f.write("\n[tenants.mallory]\nweight = 0\n")
        with pytest.raises(kc.InvalidValueError) as e:
            admin.call("reload")
        msg = str(e.value)
        assert "running configuration stays" in msg and "tenant 'mallory'" in msg and "'weight'" in msg
        os.kill(b.proc.pid, signal.SIGHUP)      # the same through SIGHUP: logged, nothing changes
        time.sleep(0.5)
        st = admin.call("status")
        assert list(st["tenants"]) == ["alice"]
        assert st["tenants"]["alice"]["devices"]["cpu0"]["weight"] == 200
        assert a.device("cpu0").allocate(16).size == 16
        assert "reload refused" in b.log()
        rewrite(b, {"alice": {"weight": 50}}, quantum_ms=5)
        r = admin.call("reload")
        assert r["added"] == [] and r["removed"] == []
        assert admin.call("status")["quantum_ms"] == 5
        assert quota(admin, "alice")["weight"] == 50


def test_reload_removing_a_tenant_while_it_sends(broker_factory, raw_socket):
    from kubecash.broker.local import toml_dumps
    b = broker_factory({"alice": {}, "bob": {}})
    flood = raw_socket(b.address("bob"))
    for _ in range(2000):
        flood.send(P.pack({"v": 1, "id": 1, "op": "hello"}))
    with open(b.config_path, "w") as f:
        f.write(toml_dumps({"runtime_dir": b.runtime_dir, "heartbeat_interval_s": 0.25,
                            "heartbeat_timeout_s": 1.5, "metrics_address": "127.0.0.1:0"},
                           {"alice": {}}))
    with b.admin() as admin:
        assert admin.call("reload")["removed"] == ["bob"]
    time.sleep(0.3)
    assert b.alive()
    with b.connect("alice") as s:
        assert s.device("cpu0").allocate(16).size == 16


@pytest.mark.parametrize("settings, tenants, what", [
    ({"quantum_ms": float("inf")}, {"alice": {}}, "field 'quantum_ms'"),   # R6: SIGHUP killed the broker
    ({}, {"alice": {}, ".": {}}, "tenant '.'"),                           # R7: made tenants/ 0700
])
def test_a_reload_with_an_unusable_value_keeps_the_broker_and_its_configuration(broker_factory, settings,
                                                                                 tenants, what):
    b = broker_factory({"alice": {"weight": 200}})
    tenants_dir = os.path.join(b.runtime_dir, "tenants")
    mode = os.stat(tenants_dir).st_mode
    with b.admin() as admin, b.connect("alice") as a:
        rewrite(b, tenants, **settings)
        os.kill(b.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in b.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload refused" in b.log() and what in b.log()
        assert b.proc.poll() is None, "the broker died"
        st = admin.call("status")
        assert list(st["tenants"]) == ["alice"] and st["quantum_ms"] == 10
        assert a.device("cpu0").allocate(16).size == 16
        assert os.stat(tenants_dir).st_mode == mode
