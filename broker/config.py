"""The quota file: TOML, validated at load with errors naming the file, tenant and field.

    [broker]
    runtime_dir = "/run/kubecash"      # sockets live in <runtime_dir>/tenants/<tenant>/
    quantum_ms = 10                    # device lease length
    heartbeat_interval_s = 1.0         # clients ping this often ...
    heartbeat_timeout_s = 5.0          # ... and are dropped after this much silence
    executor_threads = 0               # CPU backend worker threads per executor (0 = all cores)
    cache_dir = ""                     # compiled-kernel cache ("" = <runtime_dir>/cache)
    cache_max_bytes = 2147483648       # cap on that cache; the oldest builds go first
    max_message_bytes = 67108864
    metrics_address = "127.0.0.1:9464" # Prometheus /metrics ("" = off; port 0 = any free port)
    admin_socket = ""                  # brokerctl's socket, owner-only ("" = <runtime_dir>/admin.sock)
    max_sessions_per_tenant = 256      # open sessions per tenant (a hello past it is refused)
    max_handles_per_session = 65536    # allocations + streams + events + modules + functions
    max_modules_per_session = 256      # loaded (and loading) modules per session and device
    max_module_bytes = 8388608         # module source/image size (protocol caps: 8 MiB source, 32 MiB image)
    max_queued_ops_per_session = 4096  # executor-side queued work per session (see README)
    max_connections_per_tenant = 600   # open connections to a tenant's broker socket (2 per session)
    max_requests_per_tenant_s = 2000   # broker requests per second and tenant (past it: back-pressure)
    sandbox = true                     # confine CPU-backend kernels with seccomp (see README)

    [tenants.alice]                    # a tenant: a name of [A-Za-z0-9_.-], 1-64 chars
    memory = "512MiB"                  # per-device memory quota (absent = the device's memory)
    weight = 100                       # share under contention, 1-10000
    limit = 0.5                        # hard cap on device time, 0.0001 and up (absent = none)
    class = "batch"                    # or "latency"
    devices = ["cpu0"]                 # devices it may use (absent = all)
    max_kernel_seconds = 0             # 0 = no bound
    owner = "1000:1000"                # uid[:gid] its containers run as (absent: root only)

    [tenants.alice.device.gpu0]        # per-device overrides of memory/weight/limit/class
    memory = "8GiB"
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from typing import Any

from kubecash.client.errors import KubecashError


class ConfigError(KubecashError):
    """The quota file is invalid; the message names the file, the tenant and the field."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CLASSES = ("batch", "latency")
QUOTA_FIELDS = ("memory", "weight", "limit", "class", "max_kernel_seconds")


def parse_owner(value: Any) -> tuple[int, int]:
    """"1000", "1000:1000", "alice" or "alice:staff" (names looked up here) -> (uid, gid)."""
    import grp
    import pwd
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError('expected "uid[:gid]" (numbers or names), e.g. "1000:1000"')
    user, _, group = value.partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            default_gid = uid
        else:
            pw = pwd.getpwnam(user)
            uid, default_gid = pw.pw_uid, pw.pw_gid
        gid = default_gid if not group else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ValueError(f"no such user or group on this node: {e.args[0]}") from None
    return uid, gid


def parse_size(value: Any) -> int:
    """'512MiB' / '8GiB' / '1.5GB' / 1048576 -> bytes. Raises ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"512MiB\" or a byte count")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    raise ValueError(f"{value!r} is not a size (use e.g. \"512MiB\", \"8GiB\", or a byte count)")


@dataclasses.dataclass(frozen=True)
class Quota:
    memory: int | None = None          # bytes; None = the device's capacity
    weight: int = 100
    limit: float | None = None         # fraction of one device's time; None = no cap
    klass: str = "batch"
    max_kernel_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota
    devices: tuple[str, ...] | None = None          # None = every device
    per_device: dict[str, Quota] = dataclasses.field(default_factory=dict)
    owner: tuple[int, int] | None = None            # uid, gid its containers run as; None: root

    def quota_for(self, device: str) -> Quota:
        return self.per_device.get(device, self.quota)

    def may_use(self, device: str) -> bool:
        return self.devices is None or device in self.devices


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    runtime_dir: str = "/run/kubecash"
    quantum_ms: float = 10.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    executor_threads: int = 0
    cache_dir: str = ""
    cache_max_bytes: int = 2 << 30            # compiled-kernel cache cap (oldest evicted first)
    max_message_bytes: int = 64 << 20
    metrics_address: str = "127.0.0.1:9464"   # Prometheus endpoint "host:port"; "" = off
    admin_socket: str = ""                    # brokerctl's socket ("" = <runtime_dir>/admin.sock)
    # Per-tenant bounds on what a tenant can make the broker and its executors hold (issue 7).
    max_sessions_per_tenant: int = 256
    max_handles_per_session: int = 65536
    max_modules_per_session: int = 256
    max_module_bytes: int = 8 << 20
    max_queued_ops_per_session: int = 4096
    max_connections_per_tenant: int = 600     # a session holds two (requests, heartbeats)
    max_requests_per_tenant_s: float = 2000.0
    # CPU backend: kernels run on threads confined by a seccomp filter (no files, sockets or
    # programs). false runs tenant native code unconfined, with the executor's privileges.
    sandbox: bool = True

    @property
    def resolved_admin_socket(self) -> str:
        return self.admin_socket or os.path.join(self.runtime_dir, "admin.sock")

    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.runtime_dir, "cache")


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    broker: BrokerSettings
    tenants: dict[str, Tenant]


def _fail(path: str, where: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {msg}")


def _number(v: Any, *, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ValueError(f"expected {'an integer' if integer else 'a number'}, got {v!r}")
    return v


def _quota(path: str, where: str, table: dict[str, Any], base: Quota, max_limit: float) -> Quota:
    fields: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{where}, field '{key}'"
        try:
            if key == "memory":
                fields["memory"] = parse_size(value)
            elif key == "weight":
                w = _number(value, integer=True)
                if not 1 <= w <= 10000:
                    raise ValueError(f"must be an integer from 1 to 10000, got {w}")
                fields["weight"] = int(w)
            elif key == "limit":
                lim = float(_number(value))
                if not 0.0001 <= lim <= max_limit:
                    raise ValueError(f"must be from 0.0001 to {max_limit:g} (the number of "
                                     f"devices), got {lim:g}")
                fields["limit"] = lim
            elif key == "class":
                if value not in CLASSES:
                    raise ValueError(f"must be one of {', '.join(CLASSES)}, got {value!r}")
                fields["klass"] = value
            elif key == "max_kernel_seconds":
                s = float(_number(value))
                if s < 0:
                    raise ValueError(f"must be 0 (no bound) or positive, got {s:g}")
                fields["max_kernel_seconds"] = s
            else:
                raise ValueError(f"unknown field (allowed: {', '.join(QUOTA_FIELDS)})")
        except ValueError as e:
            raise _fail(path, at, str(e)) from None
    return dataclasses.replace(base, **fields)


def parse(data: dict[str, Any], path: str = "<config>", device_count: int = 64) -> Config:
    """Validate a decoded TOML document. `device_count` bounds `limit` (it may span devices)."""
    allowed_top = {"broker", "tenants"}
    for key in data:
        if key not in allowed_top:
            raise _fail(path, f"table '{key}'", "unknown (allowed: broker, tenants)")
    b = data.get("broker", {})
    if not isinstance(b, dict):
        raise _fail(path, "broker", "must be a table")
    defaults = BrokerSettings()
    settings: dict[str, Any] = {}
    for key, value in b.items():
        at = f"[broker] field '{key}'"
        if key not in {f.name for f in dataclasses.fields(BrokerSettings)}:
            raise _fail(path, at, "unknown field")
        want = type(getattr(defaults, key))
        try:
            if want is str:
                if not isinstance(value, str):
                    raise ValueError(f"expected a string, got {value!r}")
            elif want is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
            elif want is int:
                value = int(_number(value, integer=True))
                if value < 0:
                    raise ValueError("must not be negative")
            else:
                value = float(_number(value))
                if value <= 0:
                    raise ValueError("must be positive")
        except ValueError as e:
            raise _fail(path, at, str(e)) from None
        settings[key] = value
    broker = dataclasses.replace(defaults, **settings)
    if broker.metrics_address:
        host, sep, port = broker.metrics_address.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise _fail(path, "[broker] field 'metrics_address'",
                        f"must be \"host:port\" (or \"\" for none), got {broker.metrics_address!r}")
    for key in ("max_message_bytes", "max_sessions_per_tenant", "max_handles_per_session",
                "max_modules_per_session", "max_module_bytes", "max_queued_ops_per_session",
                "max_connections_per_tenant"):
        if getattr(broker, key) < 1:      # 0 would refuse everything: not a way to say "unbounded"
            raise _fail(path, f"[broker] field '{key}'", "must be at least 1")
    if broker.heartbeat_timeout_s <= broker.heartbeat_interval_s:
        raise _fail(path, "[broker] field 'heartbeat_timeout_s'",
                    "must be larger than heartbeat_interval_s")

    tenants_tbl = data.get("tenants", {})
    if not isinstance(tenants_tbl, dict):
        raise _fail(path, "tenants", "must be a table of tenants")
    tenants: dict[str, Tenant] = {}
    for name, t in tenants_tbl.items():
        where = f"tenant '{name}'"
        if not TENANT_NAME_RE.match(name):
            raise _fail(path, where, "name must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(t, dict):
            raise _fail(path, where, "must be a table")
        t = dict(t)
        devices = t.pop("devices", None)
        if devices is not None and (not isinstance(devices, list) or
                                    not all(isinstance(d, str) for d in devices)):
            raise _fail(path, f"{where}, field 'devices'", "must be a list of device names")
        owner = None
        if "owner" in t:
            try:
                owner = parse_owner(t.pop("owner"))
            except ValueError as e:
                raise _fail(path, f"{where}, field 'owner'", str(e)) from None
        per_dev_tbl = t.pop("device", {})
        if not isinstance(per_dev_tbl, dict):
            raise _fail(path, f"{where}, field 'device'", "must be a table of devices")
        quota = _quota(path, where, t, Quota(), device_count)
        per_device = {}
        for dev, dt in per_dev_tbl.items():
            if not isinstance(dt, dict):
                raise _fail(path, f"{where}, device '{dev}'", "must be a table")
            per_device[dev] = _quota(path, f"{where}, device '{dev}'", dt, quota, device_count)
        tenants[name] = Tenant(name, quota, tuple(devices) if devices is not None else None,
                               per_device, owner)
    return Config(path, broker, tenants)


def load(path: str, device_count: int = 64) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path, device_count)
