"""The unit under a real systemd: booted as PID 1 in a podman container (make test-systemd).

The container's root is a Debian 13 rootfs (tools/rootfs.sh, with systemd and the working tree
installed in /opt/venv), overlaid so nothing it writes reaches the cache. The node's part is
played as a node plays it: the unit file in /etc/systemd/system, the programs in /usr/local/bin,
the example quota file in /etc/kubecash, `mount --make-rshared /` before systemd starts (systemd
does that itself when the kernel starts it, not in a container), and CAP_SYS_ADMIN, which a root
broker needs to confine its executors. Everything else is systemd's: READY, reload, the
watchdog, restarts, the runtime directory.
"""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from conftest import ROOT
from podman import Podman, why_not

ROOTFS = os.environ.get("KUBECASH_SYSTEMD_ROOTFS")
UNIT = "kubecash-broker"

# A client in the container, tenant alice: a kernel on cpu0, through the broker's socket.
CLIENT = r"""
import numpy as np, kubecash.client as kc
SRC = 'extern "C" __global__ void twice(float* x, int n) {' \
      ' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2.0f; }'
with kc.connect("ipc:///run/kubecash/tenants/alice/broker.sock") as s:
    dev = s.device("cpu0")
    n = 1024
    buf = dev.allocate(n * 4)
    buf.copy_from(np.arange(n, dtype=np.float32))
    dev.launch(dev.load_module(SRC).get_kernel("twice"), (n // 256,), (256,), [buf, n])
    dev.synchronize()
    out = np.empty(n, np.float32)
    buf.copy_to(out)
    assert (out == 2 * np.arange(n, dtype=np.float32)).all(), out[:8]
    print("kernel ok", dev.mem_info())
"""


class Node:
    """A container booted with systemd; `sh` runs a command in it."""

    def __init__(self, tmp) -> None:
        self._podman = Podman(tmp)
        self.name = f"kubecash-systemd-{uuid.uuid4().hex[:8]}"
        p = self._podman("run", "-d", "--name", self.name, "--systemd=always",
                         "--cap-add", "SYS_ADMIN", "--shm-size", "1g",
                         "-v", f"{ROOT}/systemd:/unit:ro", "-v", f"{ROOT}/examples:/examples:ro",
                         "--rootfs", f"{ROOTFS}:O",
                         "/bin/sh", "-c", "mount --make-rshared / && exec /lib/systemd/systemd",
                         check=False)
        if p.returncode != 0:
            pytest.skip(f"podman cannot run a container here: {p.stderr.strip()[-300:]}")
        self.wait_for(lambda: self.sh("systemctl is-system-running", check=False).stdout.strip()
                      in ("running", "degraded"), 120, "systemd to boot")
        self.sh("mkdir -p /etc/kubecash && cp /examples/quota.toml /etc/kubecash/quota.toml"
                " && cp /unit/kubecash-broker.service /etc/systemd/system/"
                " && ln -sf /opt/venv/bin/kubecash-broker /opt/venv/bin/brokerctl /usr/local/bin/"
                " && systemctl daemon-reload")

    def sh(self, cmd: str, check: bool = True, timeout: float = 180):
        return self.exec("/bin/sh", "-c", cmd, check=check, timeout=timeout)

    def exec(self, *argv: str, check: bool = True, timeout: float = 180):
        p = self._podman("exec", self.name, *argv, check=False, timeout=timeout)
        if check:
            assert p.returncode == 0, f"{argv}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def client(self) -> str:
        return self.exec("/opt/venv/bin/python", "-c", CLIENT, timeout=300).stdout

    def show(self) -> dict[str, str]:
        out = self.sh(f"systemctl show {UNIT} -p ActiveState,SubState,MainPID,NRestarts,"
                      "StatusText,Result,WatchdogUSec").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.sh(f"journalctl -u {UNIT} --no-pager -o cat").stdout

    def status(self) -> dict:
        return json.loads(self.sh("brokerctl --json status").stdout)

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        logs = self._podman("logs", self.name, check=False).stdout[-2000:]
        pytest.fail(f"no {what} within {timeout} s; container says:\n{logs}")

    def wait_restarted(self, old_pid: str, restarts: int, timeout: float = 90) -> dict:
        def restarted():
            st = self.show()
            return (st["ActiveState"] == "active" and st["MainPID"] not in ("0", old_pid)
                    and int(st["NRestarts"]) > restarts)
        self.wait_for(restarted, timeout, "restart of the broker")
        return self.show()

    def close(self) -> None:
        self._podman("rm", "-f", "-t", "5", self.name, check=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    why = why_not(ROOTFS, "test-systemd", needs="lib/systemd/systemd")
    if why:
        pytest.skip(why)
    n = Node(tmp_path_factory.mktemp("systemd"))
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def running(node):
    """The unit started (systemctl start returns once the broker said READY=1)."""
    node.sh(f"systemctl reset-failed {UNIT} || true; systemctl start {UNIT}", timeout=120)
    return node


def test_the_unit_verifies_without_options(node):
    p = node.sh(f"systemd-analyze verify /etc/systemd/system/{UNIT}.service", check=False)
    assert p.returncode == 0 and UNIT not in p.stderr, p.stderr


def test_start_waits_for_ready_and_the_broker_serves_confined_kernels(running):
    st = running.show()
    assert st["ActiveState"] == "active" and st["SubState"] == "running", st
    assert st["StatusText"].startswith("3 tenants"), st   # STATUS= from the broker
    out = running.client()
    assert "kernel ok" in out
    journal = running.journal()
    # the tenants' file systems show through mount propagation, as on a node
    assert "no file system of its own" not in journal, journal
    assert "cannot be confined" not in journal
    assert running.status()["tenants"]["alice"]["devices"]["cpu0"]["kernels"] >= 1


def test_reload_applies_a_good_file_and_fails_naming_a_bad_one(running):
    pid = running.show()["MainPID"]
    running.sh("sed -i 's/^weight = 300/weight = 500/' /etc/kubecash/quota.toml")
    running.sh(f"systemctl reload {UNIT}")
    assert running.status()["tenants"]["alice"]["devices"]["cpu0"]["weight"] == 500
    running.sh("cp /etc/kubecash/quota.toml /tmp/good.toml"
               " && sed -i 's/^weight = 500/weight = -4/' /etc/kubecash/quota.toml")
    p = running.sh(f"systemctl reload {UNIT}", check=False)
    assert p.returncode != 0
    # ExecReload's answer, naming tenant and field, is in the unit's journal
    refused = [line for line in running.journal().splitlines() if "quota.toml" in line
               and "alice" in line and "weight" in line]
    assert refused, running.journal()[-3000:]
    st = running.show()
    assert st["ActiveState"] == "active" and st["MainPID"] == pid     # the old file stays
    assert running.status()["tenants"]["alice"]["devices"]["cpu0"]["weight"] == 500
    running.sh("cp /tmp/good.toml /etc/kubecash/quota.toml")


def test_restart_after_kill_9(running):
    st = running.show()
    running.sh(f"kill -9 {st['MainPID']}")
    after = running.wait_restarted(st["MainPID"], int(st["NRestarts"]))
    assert after["StatusText"].startswith("3 tenants"), after
    assert "kernel ok" in running.client()


def test_the_watchdog_restarts_a_hung_broker(running):
    running.sh(f"mkdir -p /etc/systemd/system/{UNIT}.service.d && printf '[Service]\\n"
               f"WatchdogSec=3s\\n' > /etc/systemd/system/{UNIT}.service.d/watchdog.conf"
               f" && systemctl daemon-reload && systemctl restart {UNIT}", timeout=120)
    try:
        st = running.show()
        assert st["WatchdogUSec"] == "3s", st
        time.sleep(8)              # pings at half of WatchdogSec keep it alive
        alive = running.show()
        assert alive["MainPID"] == st["MainPID"] and alive["ActiveState"] == "active", alive
        running.sh(f"kill -STOP {st['MainPID']}")        # a hung main loop pings no more
        running.wait_restarted(st["MainPID"], int(st["NRestarts"]))
        assert "Watchdog timeout" in running.journal()
    finally:
        running.sh(f"rm -r /etc/systemd/system/{UNIT}.service.d && systemctl daemon-reload"
                   f" && systemctl restart {UNIT}", timeout=120)


def test_tenant_directories_and_dynamic_tenants_survive_a_stop(running):
    running.sh("brokerctl tenant add dave --memory 128MiB --weight 50")
    before = running.sh("stat -c %i:%u /run/kubecash/tenants/alice /run/kubecash/tenants/dave"
                        ).stdout.split()
    running.sh(f"systemctl stop {UNIT}", timeout=120)
    assert running.show()["ActiveState"] == "inactive"
    # RuntimeDirectoryPreserve=yes: a container's bind mount of its directory stays valid
    stopped = running.sh("stat -c %i:%u /run/kubecash/tenants/alice /run/kubecash/tenants/dave"
                         ).stdout.split()
    assert stopped == before
    running.sh(f"systemctl start {UNIT}", timeout=120)
    assert running.sh("stat -c %i:%u /run/kubecash/tenants/alice /run/kubecash/tenants/dave"
                      ).stdout.split() == before
    tenants = json.loads(running.sh("brokerctl --json tenant list").stdout)
    assert "dave" in json.dumps(tenants)
    assert running.show()["StatusText"].startswith("4 tenants")
    running.sh("brokerctl tenant remove dave")
