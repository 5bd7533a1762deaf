"""The quota file: TOML, validated at load with errors naming the file, tenant and field.

Every field is declared once, below, with its default and meaning (`doc` metadata on the
dataclass fields; per-tenant bounds come from kubecash.client.limits.Limits).
`python -m kubecash.broker.config` (or `kubecash-broker --config-reference`) prints them all
as an annotated quota file; the README and examples/quota.toml point here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from typing import Any

from kubecash.client.errors import KubecashError
from kubecash.client.limits import Limits


class ConfigError(KubecashError):
    """The quota file is invalid; the message names the file, the tenant and the field."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CLASSES = ("batch", "latency")
QUOTA_FIELDS = ("memory", "weight", "limit", "class", "max_kernel_seconds")


OWNER_ID_MAX = (1 << 32) - 2
_ASCII_NUMBER = re.compile(r"[0-9]+")     # str.isdigit() takes "٠" (an Arabic-Indic zero) too


def parse_owner(value: Any, *, unlisted: bool = False) -> tuple[int, int]:
    """"1000", "1000:1000", "alice" or "alice:staff" (names looked up here) -> (uid, gid).
    A number must name a user (or group) of this node too, unless `unlisted`: a typo would
    hand the tenant's directory to a stranger uid."""
    import grp
    import pwd
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError('expected "uid[:gid]" (numbers or names), e.g. "1000:1000"')
    user, colon, group = value.partition(":")
    if not user or (colon and not group):
        raise ValueError(f'expected "uid[:gid]" (numbers or names), got {value!r}')
    try:
        if _ASCII_NUMBER.fullmatch(user):
            uid = int(user)
            default_gid = uid
        else:
            pw = pwd.getpwnam(user)
            uid, default_gid = pw.pw_uid, pw.pw_gid
        gid = default_gid if not group else int(group) if _ASCII_NUMBER.fullmatch(group) else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ValueError(f"no such user or group on this node: {e.args[0]}") from None
    # (uid_t)-1 means "leave unchanged" to setresuid: an executor meant for it would stay root.
    for what, n in (("uid", uid), ("gid", gid)):
        if n > OWNER_ID_MAX:
            raise ValueError(f"{what} {n} is out of range (0 to {OWNER_ID_MAX})")
    if not unlisted:
        for what, n, lookup, db in (("uid", uid, pwd.getpwuid, "passwd"), ("gid", gid, grp.getgrgid, "group")):
            try:
                lookup(n)
            except KeyError:
                raise ValueError(f"{what} {n} has no entry on this node (getent {db} {n} finds none); "
                                 "add one, or set [broker] unlisted_owners = true where containers run "
                                 "as ids the node does not list") from None
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


def _doc(default: Any, doc: str, example: Any = None, **kw: Any) -> Any:
    """A settings field: its default, what it means, and a value the reference shows."""
    meta = {"doc": doc, "example": example, **kw}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Quota:
    memory: int | None = _doc(None, "per-device memory quota (absent: the whole device)", '"512MiB"')
    weight: int = _doc(100, "share under contention (cpu.weight), 1-10000")
    limit: float | None = _doc(None, "hard cap, fraction of one device's time, 0.0001 up; above 1 it "
                               "spans devices (absent: none)", 0.5)
    klass: str = _doc("batch", '"batch", or "latency": preempts batch work between blocks', key="class")
    max_kernel_seconds: float = _doc(0.0, "longest kernel, seconds; 0: no bound (at most a year)")


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota
    devices: tuple[str, ...] | None = _doc(None, "devices it may use (absent: all)", '["cpu0"]')
    per_device: dict[str, Quota] = _doc({}, "[tenants.<name>.device.<device>]: per-device overrides "
                                        "of the quota fields", key="device")
    owner: tuple[int, int] | None = _doc(None, 'uid[:gid] (numbers or names) its containers run as '
                                         '(absent: root only)', '"1000:1000"')

    def quota_for(self, device: str) -> Quota:
        return self.per_device.get(device, self.quota)

    def may_use(self, device: str) -> bool:
        return self.devices is None or device in self.devices


@dataclasses.dataclass(frozen=True)
class BrokerSettings(Limits):
    """[broker]: the node-wide settings, plus every per-tenant bound of Limits."""
    runtime_dir: str = _doc("/run/kubecash", "sockets: <runtime_dir>/tenants/<tenant>/broker.sock (absolute)",
                            path=True)
    quantum_ms: float = _doc(10.0, "device lease length", lo=0.1, hi=10000)
    heartbeat_interval_s: float = _doc(1.0, "clients ping this often ...", lo=0.01, hi=3600)
    heartbeat_timeout_s: float = _doc(5.0, "... and their session ends after this much silence", lo=0.02, hi=86400)
    executor_threads: int = _doc(0, "CPU backend worker threads per executor (0: all cores)", lo=0, hi=4096)
    cpu_devices: int = _doc(1, "CPU devices presented (cpu0, cpu1, ...: each has its own executors, "
                            "scheduler and quotas; they share the node's cores; read at start)", lo=1, hi=16)
    executor_start_timeout_s: float = _doc(30.0, "an executor not ready this long after it started is killed "
                                           "(its opens fail, saying so)", lo=1, hi=3600)
    cache_dir: str = _doc("", 'compiled kernels, per tenant in tenants/<tenant> ("": <runtime_dir>/cache; '
                          'else an absolute path)',
                          path=True, empty=True)
    cache_max_bytes: int = _doc(2 << 30, "cap on that cache (all tenants together): oldest builds go first",
                                lo=0, hi=1 << 60)
    metrics_address: str = _doc("127.0.0.1:9464", 'Prometheus /metrics "host:port" ("": off; port 0: any free port)')
    admin_socket: str = _doc("", 'brokerctl\'s socket, owner-only ("": <runtime_dir>/admin.sock; else absolute)',
                             path=True, empty=True)
    executor_uid_min: int = _doc(61184, "executors of a tenant with no owner (or owner root) run as a uid "
                                 "from here ...", lo=1, hi=(1 << 32) - 2)
    executor_uid_max: int = _doc(65519, "... to here, one per tenant (a root broker; see README, \"Sandbox\")",
                                 lo=1, hi=(1 << 32) - 2)
    mount_namespace: str = _doc("/proc/1/ns/mnt", "the mount namespace containers are made in: a root broker "
                                "mounts each new tenant directory's own file system there (\"\": none; README, "
                                "\"Sandbox\")", path=True, empty=True)
    state_dir: str = _doc("/var/lib/kubecash", "the broker's state: dynamic tenants (tenants.json; "
                          "brokerctl tenant), kept across restarts (absolute)", path=True)
    unlisted_owners: bool = _doc(False, "accept owner uids and gids this node has no user or group for "
                                 "(containers' ids often are not in /etc/passwd)")
    # CPU backend: kernels run on threads confined by a seccomp filter (no files, sockets or
    # programs). false runs tenant native code unconfined, with the executor's privileges.
    sandbox: bool = _doc(True, 'confine CPU-backend kernels with seccomp (README, "Sandbox")')

    @property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

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
    if not math.isfinite(v):          # TOML has inf and nan; no setting means either
        raise ValueError(f"must be a finite number, got {v!r}")
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
                if not 0 <= s <= 365 * 86400:
                    raise ValueError(f"must be 0 (no bound) or positive, at most a year, got {s:g}")
                fields["max_kernel_seconds"] = s
            else:
                raise ValueError(f"unknown field (allowed: {', '.join(QUOTA_FIELDS)})")
        except ValueError as e:
            raise _fail(path, at, str(e)) from None
    return dataclasses.replace(base, **fields)


_FIELDS = {f.name: f for f in dataclasses.fields(BrokerSettings)}


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
        if key not in _FIELDS:
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
            meta = _FIELDS[key].metadata
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None and not lo <= value <= hi:
                raise ValueError(f"must be from {lo:g} to {hi:g}, got {value:g}")
            if meta.get("path") and not (value == "" and meta.get("empty")):
                if not value or not os.path.isabs(value) or "\0" in value:
                    alt = ' (or "")' if meta.get("empty") else ""
                    raise ValueError(f"must be an absolute path{alt}, got {value!r}")
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
    if broker.mount_namespace:
        from .confine import check_mount_namespace
        try:
            check_mount_namespace(broker.mount_namespace)
        except ValueError as e:
            raise _fail(path, "[broker] field 'mount_namespace'", str(e)) from None
    if broker.executor_uid_max < broker.executor_uid_min:
        raise _fail(path, "[broker] field 'executor_uid_max'", "must not be below executor_uid_min")
    if broker.heartbeat_timeout_s <= broker.heartbeat_interval_s:
        raise _fail(path, "[broker] field 'heartbeat_timeout_s'",
                    "must be larger than heartbeat_interval_s")

    tenants_tbl = data.get("tenants", {})
    if not isinstance(tenants_tbl, dict):
        raise _fail(path, "tenants", "must be a table of tenants")
    tenants = {name: parse_tenant(path, name, t, broker, device_count) for name, t in tenants_tbl.items()}
    return Config(path, broker, tenants)


def parse_tenant(path: str, name: Any, t: Any, broker: BrokerSettings, device_count: int = 64) -> Tenant:
    """Validate one tenant's table (`[tenants.<name>]` of a quota file, or a dynamic tenant's,
    which must pass exactly the same rules); errors name `path`, the tenant and the field."""
    where = f"tenant '{name}'"
    if not isinstance(name, str) or not TENANT_NAME_RE.match(name) or name in (".", ".."):
        # . and .. would name the tenants directory itself, or the runtime directory
        raise _fail(path, where, "name must be 1-64 characters of A-Z a-z 0-9 _ . -, not . or ..")
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
            owner = parse_owner(t.pop("owner"), unlisted=broker.unlisted_owners)
        except ValueError as e:
            raise _fail(path, f"{where}, field 'owner'", str(e)) from None
    per_dev_tbl = t.pop("device", {})
    if not isinstance(per_dev_tbl, dict):
        raise _fail(path, f"{where}, field 'device'", "must be a table of devices")
    quota = _quota(path, where, t, Quota(), device_count)
    per_device = {}
    for dev, dt in per_dev_tbl.items():
        if not isinstance(dev, str):      # TOML keys always are; a dynamic tenant's may not be
            raise _fail(path, f"{where}, field 'device'", f"device names are strings, got {dev!r}")
        if not isinstance(dt, dict):
            raise _fail(path, f"{where}, device '{dev}'", "must be a table")
        per_device[dev] = _quota(path, f"{where}, device '{dev}'", dt, quota, device_count)
    return Tenant(name, quota, tuple(devices) if devices is not None else None, per_device, owner)


def _quota_table(q: Quota, base: Quota) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Quota):
        v, b = getattr(q, f.name), getattr(base, f.name)
        if v == b:
            continue
        if v is None:       # the file has no way to say "none here" where the base has one
            raise ValueError(f"field '{f.metadata.get('key', f.name)}' cannot be unset for one device "
                             "alone in a tenant's table")
        out[f.metadata.get("key", f.name)] = v
    return out


def tenant_table(t: Tenant) -> dict[str, Any]:
    """A tenant as the table its quota-file entry would be (what parse_tenant reads back to an
    equal Tenant): sizes in bytes, the owner as "uid:gid". ValueError for what no table says."""
    table = _quota_table(t.quota, Quota())
    if t.devices is not None:
        table["devices"] = list(t.devices)
    if t.owner is not None:
        table["owner"] = f"{t.owner[0]}:{t.owner[1]}"
    if t.per_device:
        table["device"] = {d: _quota_table(q, t.quota) for d, q in t.per_device.items()}
    return table


def shared_owners(config: Config) -> dict[int, list[str]]:
    """Owner uids that more than one tenant names. Their containers and executors run as one
    uid, so those tenants are not isolated from each other (the broker warns)."""
    by_uid: dict[int, list[str]] = {}
    for t in config.tenants.values():
        if t.owner is not None and t.owner[0] != 0:     # owner root: executors get their own uid
            by_uid.setdefault(t.owner[0], []).append(t.name)
    return {uid: sorted(names) for uid, names in by_uid.items() if len(names) > 1}


def load(path: str, device_count: int = 64) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path, device_count)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _reference_lines(cls: type, indent: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            continue
        key = f.metadata.get("key", f.name)
        example = f.metadata.get("example")
        if example is not None:
            value = str(example)
        elif f.default is None or isinstance(f.default, dict) or f.default is dataclasses.MISSING:
            continue
        else:
            value = _toml_value(f.default)
        if key == "device":
            continue
        out.append(f"{indent}{key} = {value}".ljust(38) + f" # {f.metadata['doc']}")
    return out


def reference() -> str:
    """Every field of the quota file, with its default (or an example) and its meaning."""
    lines = ["# KubeCASH quota file: every field, its default (or an example value) and meaning.",
             "# Errors name the file, the tenant and the field; a bad reload keeps the running config.",
             "", "[broker]"]
    lines += _reference_lines(BrokerSettings)
    lines += ["", "[tenants.alice]".ljust(38) + " # a tenant: a name of 1-64 of A-Z a-z 0-9 _ . - (not . or ..)"]
    lines += _reference_lines(Quota) + _reference_lines(Tenant)
    device_doc = next(f.metadata["doc"] for f in dataclasses.fields(Tenant) if f.name == "per_device")
    lines += ["", "[tenants.alice.device.cpu0]".ljust(38) + f" # {device_doc.split(': ', 1)[1]}",
              'memory = "256MiB"']
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import sys
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m kubecash.broker.config   (prints the quota file reference)", file=sys.stderr)
        return 2
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
