"""Fixtures: a real broker daemon in a subprocess, real sockets, every resource closed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import pytest
import zmq

import kubecash.client as kc
from kubecash.client import protocol as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_dumps(broker: dict, tenants: dict[str, dict]) -> str:
    lines = ["[broker]"] + [f"{k} = {_toml_value(v)}" for k, v in broker.items()]
    for name, t in tenants.items():
        lines.append(f"\n[tenants.{name}]")
        per_dev = t.get("device", {})
        lines += [f"{k} = {_toml_value(v)}" for k, v in t.items() if k != "device"]
        for dev, dt in per_dev.items():
            lines.append(f"[tenants.{name}.device.{dev}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in dt.items()]
    return "\n".join(lines) + "\n"


class BrokerProcess:
    """A kubecash-broker daemon started as a real subprocess on a private runtime dir."""

    def __init__(self, tenants: dict[str, dict], cache_dir: str, **broker: Any):
        # ipc:// paths must stay short (about 100 bytes): a short private directory.
        self.runtime_dir = broker.pop("runtime_dir", None) or tempfile.mkdtemp(prefix="kc-", dir="/tmp")
        settings = {"runtime_dir": self.runtime_dir, "cache_dir": cache_dir,
                    "heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5,
                    "executor_threads": 2, **broker}
        self.config_path = os.path.join(self.runtime_dir, "quota.toml")
        with open(self.config_path, "w") as f:
            f.write(toml_dumps(settings, tenants))
        self.tenants = list(tenants)
        self.log_path = os.path.join(self.runtime_dir, "broker.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubecash.broker.daemon", "--config", self.config_path,
             "--log-level", "INFO"], stdout=self._log, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"})
        deadline = time.monotonic() + 20
        while not all(os.path.exists(self.socket_path(t)) for t in self.tenants):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker did not start:\n" + self.log())
            time.sleep(0.02)

    def socket_path(self, tenant: str) -> str:
        return P.broker_socket_path(self.runtime_dir, tenant)

    def address(self, tenant: str) -> str:
        return f"ipc://{self.socket_path(tenant)}"

    def connect(self, tenant: str) -> kc.Session:
        return kc.connect(self.address(tenant))

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kernel-cache"))


@pytest.fixture
def broker_factory(kernel_cache):
    started: list[BrokerProcess] = []

    def start(tenants: dict[str, dict] | None = None, **broker: Any) -> BrokerProcess:
        b = BrokerProcess(tenants or {"alice": {"memory": "256MiB"}, "bob": {"memory": "256MiB"}},
                          kernel_cache, **broker)
        started.append(b)
        return b
    yield start
    for b in started:
        alive = b.alive()
        b.stop()
        assert alive, "the broker died during the test"


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    return broker_factory()


@pytest.fixture
def session(broker):
    with broker.connect("alice") as s:
        yield s


@pytest.fixture
def raw_socket():
    """A bare DEALER socket for sending hand-made (hostile) frames; closed afterwards."""
    ctx = zmq.Context()
    socks = []

    def make(address: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10000)
        s.connect(address)
        socks.append(s)
        return s
    yield make
    for s in socks:
        s.close()
    ctx.term()


def run_client(code: str, address: str, timeout: float = 120, **popen: Any) -> subprocess.Popen:
    """Start a real client process running `code` with KUBECASH_BROKER=address."""
    env = dict(os.environ, KUBECASH_BROKER=address, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
