"""Operating the broker: brokerctl verbs, systemd notify and unit, metrics, CDI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT
from kernels import VECADD

import kubecash.client as kc
from kubecash.broker.local import LocalBroker
from kubecash.client import protocol as P

BROKERCTL = os.path.join(os.path.dirname(sys.executable), "brokerctl")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def ctl(broker, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([BROKERCTL, "--runtime-dir", broker.runtime_dir, *args],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def run_kernels(s: kc.Session, n_launches: int = 5) -> None:
    dev = s.device("cpu0")
    n = 4096
    a = dev.allocate(n * 4)
    a.copy_from(np.ones(n, np.float32))
    k = dev.load_module(VECADD).get_kernel("vadd")
    for _ in range(n_launches):
        dev.launch(k, (n // 256,), (256,), [a, a, a, n])
    dev.synchronize()


def test_status_shows_what_the_tenants_did(broker):
    with broker.connect("alice") as s:
        run_kernels(s, 5)
        time.sleep(0.4)                      # executor statistics arrive every 0.25 s
        st = json.loads(ctl(broker, "--json", "status").stdout)
        alice = st["tenants"]["alice"]["devices"]["cpu0"]
        assert st["tenants"]["alice"]["sessions"] == 1 and st["tenants"]["bob"]["sessions"] == 0
        assert alice["kernels"] == 5 and alice["used_ns"] > 0
        # its buffer (whole pages), its staging segment, its module's code and globals
        held = 4096 * 4 + (32 << 20)
        assert held < alice["memory_used"] < held + (1 << 20) and alice["memory_limit"] == 256 << 20
        assert st["devices"]["cpu0"]["kind"] == "cpu"
        table = ctl(broker, "status").stdout
        assert "alice" in table and "bob" in table and "cpu0" in table and "SHARE" in table
        tenants = ctl(broker, "tenants").stdout
        assert "alice (1 sessions)" in tenants and "memory 256MiB" in tenants
        assert json.loads(ctl(broker, "--json", "tenants").stdout)["bob"]["sessions"] == 0
        # --json goes before or after the command, as the README shows it
        assert json.loads(ctl(broker, "status", "--json").stdout)["tenants"]["alice"]["sessions"] == 1
        assert json.loads(ctl(broker, "tenants", "--json").stdout)["bob"]["sessions"] == 0


def test_set_evict_reload_and_errors(broker):
    r = json.loads(ctl(broker, "--json", "set", "alice", "--weight", "400", "--limit", "0.5",
                       "--memory", "1MiB", "--class", "latency").stdout)
    assert r == {"tenant": "alice", "warnings": []}
    q = json.loads(ctl(broker, "--json", "status").stdout)["tenants"]["alice"]["devices"]["cpu0"]
    assert (q["weight"], q["limit"], q["memory_limit"], q["class"]) == (400, 0.5, 1 << 20, "latency")
    with broker.connect("alice") as s:
        with pytest.raises(kc.OutOfMemoryError):
            s.device("cpu0").allocate(2 << 20)
        out = ctl(broker, "evict", "alice").stdout
        assert "evicted alice: 1 sessions ended" in out
        with pytest.raises(kc.KubecashError, match="evicted"):
            for _ in range(50):
                s.device("cpu0").mem_info()
                time.sleep(0.05)
    assert "reloaded: 2 tenants" in ctl(broker, "reload").stdout
    # The file still says what it said: reload put alice back to the file's quota.
    q = json.loads(ctl(broker, "--json", "status").stdout)["tenants"]["alice"]["devices"]["cpu0"]
    assert q["weight"] == 100 and q["memory_limit"] == 256 << 20
    for args, message in [(("set", "mallory", "--weight", "2"), "no tenant 'mallory'"),
                          (("set", "alice", "--weight", "0"), "field 'weight'"),
                          (("set", "alice"), "nothing to change"),
                          (("drain", "gpu9"), "no device 'gpu9'"),
                          (("evict", "nobody"), "no tenant 'nobody'")]:
        p = ctl(broker, *args, check=False)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith("brokerctl: ") and message in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([BROKERCTL, "--runtime-dir", "/nonexistent", "--json", "status"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no broker answering" in p.stderr


def test_drain_grants_no_new_leases_until_undone(broker):
    with broker.connect("alice") as s:
        dev = s.device("cpu0")
        n = 4096
        a = dev.allocate(n * 4)
        a.copy_from(np.ones(n, np.float32))
        k = dev.load_module(VECADD).get_kernel("vadd")
        assert json.loads(ctl(broker, "--json", "drain", "cpu0").stdout)["draining"] is True
        done = threading.Event()

        def work():
            dev.launch(k, (n // 256,), (256,), [a, a, a, n])
            dev.synchronize()
            done.set()
        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            assert not done.wait(1.0), "work ran on a draining device"
            assert "draining" in ctl(broker, "status").stdout
        finally:                            # never leave the worker blocked on the session
            ctl(broker, "drain", "cpu0", "--undo")
        assert done.wait(20), "work did not resume after the drain was undone"
        t.join()
        np.testing.assert_array_equal(a.copy_to(np.empty(n, np.float32)), 2.0)


def test_top_refreshes(broker):
    p = ctl(broker, "top", "--count", "2")
    assert p.stdout.count("kubecash broker  up") == 2 and "alice" in p.stdout


def test_cdi_spec_validates_against_the_official_schema(broker, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema_dir = os.path.join(SHARED, "cdi-schema")
    if not os.path.isdir(schema_dir):
        pytest.skip(f"the CDI schema is not at {schema_dir}")
    out = tmp_path / "kubecash.json"
    ctl(broker, "cdi", "-o", str(out))
    spec = json.loads(out.read_text())
    with open(os.path.join(schema_dir, "schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(schema_dir, "defs.json")) as f:
        defs = json.load(f)
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7
    # defs.json declares no $schema: it is draft-07, like the schema that refers to it.
    registry = Registry().with_resource("defs.json", Resource.from_contents(defs, default_specification=DRAFT7))
    jsonschema.Draft7Validator(schema, registry=registry).validate(spec)
    # The lowest version its content needs: podman 4.3 refuses 1.0.0 and 0.6.0.
    assert spec["kind"] == "kubecash.io/tenant" and spec["cdiVersion"] == "0.3.0"
    alice = {d["name"]: d for d in spec["devices"]}["alice"]["containerEdits"]
    assert alice["env"] == ["KUBECASH_BROKER=ipc:///run/kubecash/tenants/alice/broker.sock"]
    (mount,) = alice["mounts"]
    assert mount["hostPath"] == os.path.join(broker.runtime_dir, "tenants", "alice")
    assert mount["containerPath"] == "/run/kubecash/tenants/alice"
    # the native driver libraries, read-only, found by the loader; no device node anywhere
    from kubecash import native
    (libs,) = spec["containerEdits"]["mounts"]
    # the broker's copy, in its runtime directory (a host path whatever the package's install)
    assert libs["hostPath"] == os.path.join(broker.runtime_dir, "lib")
    assert "ro" in libs["options"] and "noexec" not in libs["options"]
    assert spec["containerEdits"]["env"][0].startswith(f"LD_LIBRARY_PATH={libs['containerPath']}:")
    for n in native.LIBS:
        with open(os.path.join(libs["hostPath"], n), "rb") as a, open(os.path.join(native.libdir(), n), "rb") as b:
            assert a.read() == b.read()
        assert os.stat(os.path.join(libs["hostPath"], n)).st_mode & 0o777 == 0o644
    assert "deviceNodes" not in json.dumps(spec)
    ctl(broker, "cdi", "--no-libraries", "-o", str(out))
    assert "containerEdits" not in json.loads(out.read_text())
    # The invalid spec would be caught: the schema really is being applied.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema, registry=registry).validate({"kind": 3, "devices": []})


def _notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(20)
    return sock, path


def _expect(sock, key: str, seen: list[str]) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for msg in seen:
            if key in msg.split("\n"):
                seen.remove(msg)
                return msg
        seen.append(sock.recv(4096).decode())
    pytest.fail(f"no {key} from the broker; got {seen}")


def test_systemd_notify_ready_status_watchdog_reload_stop(kernel_cache, tmp_path, monkeypatch):
    sock, path = _notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")      # a ping every 0.1 s
    b = LocalBroker({"alice": {}}, cache_dir=kernel_cache)
    try:
        seen: list[str] = []
        ready = _expect(sock, "READY=1", seen)
        assert f"MAINPID={b.proc.pid}" in ready and "STATUS=1 tenants" in ready
        _expect(sock, "WATCHDOG=1", seen)
        _expect(sock, "WATCHDOG=1", seen)
        with kc.connect(b.address("alice")) as s:
            s.device("cpu0").allocate(16)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:       # STATUS= follows what happens
                msg = sock.recv(4096).decode()
                if "1 sessions, 1 executors" in msg:
                    break
            else:
                pytest.fail("no STATUS= line with the new session")
        os.kill(b.proc.pid, signal.SIGHUP)
        _expect(sock, "RELOADING=1", seen)
        _expect(sock, "READY=1", seen)
        b.proc.send_signal(signal.SIGTERM)
        _expect(sock, "STOPPING=1", seen)
        assert b.proc.wait(20) == 0
    finally:
        b.close()
        sock.close()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    unit = open(os.path.join(ROOT, "systemd", "kubecash-broker.service")).read()
    assert "Type=notify" in unit and "RuntimeDirectory=kubecash" in unit
    assert "ExecReload=/usr/local/bin/brokerctl reload" in unit and "WatchdogSec=" in unit
    assert "/bin/kill" not in unit          # a minimal image has none
    # Verified as installed here: ExecStart and ExecReload pointing at this environment's
    # scripts (the unit names /usr/local/bin, where a root pip install puts them on a node).
    bindir = os.path.dirname(sys.executable)
    installed = tmp_path / "kubecash-broker.service"
    installed.write_text(unit.replace("/usr/local/bin/", bindir + "/"))
    p = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "kubecash-broker.service" not in p.stderr, p.stderr


def test_metrics_endpoint_serves_prometheus_text_agreeing_with_status(broker):
    from prometheus_client.parser import text_string_to_metric_families
    with broker.connect("alice") as s:
        run_kernels(s, 3)
        time.sleep(1.5)                         # the snapshot is refreshed every second
        with broker.admin() as admin:
            st = admin.call("status")
        addr = st["metrics_address"]
        assert addr and addr.startswith("127.0.0.1:")
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ["kubecash_device_seconds", "kubecash_kernels", "kubecash_share_ratio",
                 "kubecash_memory_used_bytes", "kubecash_memory_limit_bytes",
                 "kubecash_queue_wait_seconds", "kubecash_sessions", "kubecash_broker_up",
                 "kubecash_device_busy_ratio"]:
        assert name in fams, name

    def value(name, **labels):
        for smp in fams[name].samples:
            if all(smp.labels.get(k) == v for k, v in labels.items()) and \
                    smp.name in (name, name + "_total"):
                return smp.value
        raise KeyError((name, labels))
    alice = st["tenants"]["alice"]["devices"]["cpu0"]
    assert value("kubecash_kernels", tenant="alice", device="cpu0") == alice["kernels"] == 3
    assert value("kubecash_memory_used_bytes", tenant="alice", device="cpu0") == alice["memory_used"]
    assert value("kubecash_memory_limit_bytes", tenant="alice", device="cpu0") == 256 << 20
    assert value("kubecash_sessions", tenant="alice") == 1
    assert value("kubecash_connections", tenant="alice") == 2      # requests and heartbeats
    assert value("kubecash_throttled", tenant="alice") == 0
    assert value("kubecash_device_seconds", tenant="alice", device="cpu0") == \
        pytest.approx(alice["used_ns"] / 1e9, rel=1e-6)
    counts = [smp for smp in fams["kubecash_queue_wait_seconds"].samples
              if smp.name.endswith("_count") and smp.labels["tenant"] == "alice"]
    assert counts[0].value == alice["grants"] > 0
    assert "# TYPE kubecash_device_seconds_total counter" in text


def test_the_admin_socket_is_owner_only(broker):
    mode = os.stat(broker.admin_path).st_mode & 0o777
    assert mode & 0o077 == 0, oct(mode)


def test_the_broker_refuses_to_start_on_an_invalid_file(tmp_path):
    bad = tmp_path / "quota.toml"
    bad.write_text('[broker]\nruntime_dir = "/tmp/x"\n[tenants.alice]\nweight = 0\n')
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubecash-broker"),
                        "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{bad}: tenant 'alice', field 'weight': must be an integer from 1 to 10000" in p.stderr


def test_a_request_on_an_evicted_session_hears_why(broker, raw_socket):
    """A client's heartbeat can ask before it has read the session_ended event (a loaded
    machine made test_set_evict_reload_and_errors see the bare 'unknown session'): the broker
    answers with the reason the session ended."""
    sock = raw_socket(broker.address("alice"))
    sock.send(P.request("hello", 1))
    token = P.unpack(sock.recv())["session"]
    assert "1 sessions ended" in ctl(broker, "evict", "alice").stdout
    sock.send(P.request("heartbeat", 2, session=token))
    while (r := P.unpack(sock.recv())).get("event"):
        pass                                       # the session_ended event comes first
    assert not r["ok"] and "evicted by the operator" in r["error"], r
    sock.send(P.request("heartbeat", 3, session=b"x" * 16))
    assert "unknown or ended session" in P.unpack(sock.recv())["error"]


def test_metrics_off_never_imports_prometheus_client():
    """prometheus-client is loaded only where /metrics is served (#16: a node without the
    package, or with metrics off, runs the broker all the same)."""
    code = ("import sys\n"
            "import kubecash.broker.daemon, kubecash.broker.server.core, kubecash.broker.metrics as m\n"
            "c = m.BrokerCollector(); c.publish({})\n"
            "assert 'prometheus_client' not in sys.modules, 'imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
