"""Run a broker daemon as a child process on a private runtime directory.

Used by the demo, the benchmarks and the tests: the same `kubecash-broker` an operator runs,
started with a generated quota file, and stopped (with everything it left) on close()."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from kubecash.client import protocol as P


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else quoted (a tenant may be called "a.b")."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def toml_dumps(broker: dict[str, Any], tenants: dict[str, dict[str, Any]]) -> str:
    """A quota file for these broker settings and tenants (per-device tables under "device")."""
    lines = ["[broker]"] + [f"{k} = {_toml_value(v)}" for k, v in broker.items()]
    for name, t in tenants.items():
        name = _toml_key(name)
        lines.append(f"\n[tenants.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in t.items() if k != "device"]
        for dev, dt in t.get("device", {}).items():
            lines.append(f"[tenants.{name}.device.{dev}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in dt.items()]
    return "\n".join(lines) + "\n"


class LocalBroker:
    """A `kubecash-broker` subprocess. Idempotent close(); a context manager.
    `command_prefix` runs it under another command, as a service manager would (e.g.
    `unshare --mount`: a mount namespace of its own, like systemd's sandboxing makes)."""

    def __init__(self, tenants: dict[str, dict[str, Any]] | None = None, *,
                 config_path: str | None = None, runtime_dir: str | None = None,
                 log_level: str = "INFO", start_timeout: float = 20.0,
                 command_prefix: tuple[str, ...] = (), **broker: Any):
        # ipc:// paths must stay short (about 100 bytes): a short private directory.
        self.runtime_dir = runtime_dir or tempfile.mkdtemp(prefix="kc-", dir="/tmp")
        self._own_dir = runtime_dir is None
        self._admin_socket = broker.get("admin_socket") or os.path.join(self.runtime_dir, "admin.sock")
        if config_path is None:
            config_path = os.path.join(self.runtime_dir, "quota.toml")
            with open(config_path, "w") as f:
                # Any free port for metrics, so brokers side by side do not collide; the state
                # file in the private directory (a broker restarted on it finds it there).
                settings = {"runtime_dir": self.runtime_dir, "metrics_address": "127.0.0.1:0",
                            "state_dir": os.path.join(self.runtime_dir, "state"), **broker}
                f.write(toml_dumps(settings, tenants or {}))
        self.config_path = config_path
        from . import config as cfg
        self.tenants = list(cfg.load(config_path).tenants)
        self.log_path = os.path.join(self.runtime_dir, "broker.log")
        self._log = open(self.log_path, "a")
        self._closed = False
        self.proc = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "kubecash.broker.daemon", "--config", config_path,
             "--runtime-dir", self.runtime_dir, "--log-level", log_level],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"})
        deadline = time.monotonic() + start_timeout
        # Serving means answering: sockets left by an earlier broker on the same runtime
        # dir exist before this one has bound them.
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the broker did not start:\n" + self.log())
            time.sleep(0.02)

    def _answers(self) -> bool:
        # The admin socket answers once start() is done: every tenant it can serve has its
        # socket bound (one whose directory is full is not served, and the log says so).
        if not os.path.exists(self.admin_path):
            return False
        from kubecash.client.errors import KubecashError
        try:
            with self.admin() as a:
                a.timeout = 0.5
                return a.call("status")["uptime_s"] >= 0
        except KubecashError:
            return False

    @property
    def admin_path(self) -> str:
        return self._admin_socket

    def socket_path(self, tenant: str) -> str:
        return P.broker_socket_path(self.runtime_dir, tenant)

    def address(self, tenant: str) -> str:
        return f"ipc://{self.socket_path(tenant)}"

    def env(self, tenant: str) -> dict[str, str]:
        """The environment a tenant's container gets: KUBECASH_BROKER, nothing else."""
        return dict(os.environ, KUBECASH_BROKER=self.address(tenant), PYTHONUNBUFFERED="1")

    def admin(self):
        from .ctl import AdminClient
        return AdminClient(socket=self.admin_path)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._own_dir:
            if os.geteuid() == 0:          # a root broker's tenant directories are mounts
                from .confine import unmount_tenant_fs_under
                unmount_tenant_fs_under(self.runtime_dir)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
