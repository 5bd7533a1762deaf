"""The broker's state file: its dynamic tenants (`brokerctl tenant`), kept across restarts.

`<state_dir>/tenants.json`, JSON, owner-only:

    {"format": "kubecash.io/dynamic-tenants", "version": 1,
     "tenants": {"<name>": {<its table, as [tenants.<name>] of a quota file would be>}}}

Each tenant is its quota-file table (config.tenant_table), so loading it runs the quota
file's own validation (config.parse_tenant). Written whole, atomically: a temporary file in
the same directory, fsync, rename over the old one, fsync of the directory; a crash leaves
the old file or the new one, never a mix. A file that cannot be read back (not JSON,
another format or version, a tenant the rules refuse) is applied not at all: the broker
renames it aside (`tenants.json.bad-<UTC time>`, kept for the operator) and reports it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from . import config as cfg

STATE_FILE = "tenants.json"
FORMAT = "kubecash.io/dynamic-tenants"
VERSION = 1


class StateError(Exception):
    """The state file is unusable; the message says where and why."""


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def load(path: str, broker: cfg.BrokerSettings, device_count: int) -> dict[str, cfg.Tenant]:
    """The tenants the file holds ({} where there is none yet), or StateError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{path}: not a KubeCASH state file (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise StateError(f"{path}: version {doc.get('version')!r} is not one this broker reads "
                         f"(it reads {VERSION})")
    tables = doc.get("tenants")
    if not isinstance(tables, dict) or set(doc) - {"format", "version", "tenants"}:
        raise StateError(f"{path}: expected exactly the fields format, version and tenants (an object)")
    try:
        return {name: cfg.parse_tenant(path, name, t, broker, device_count) for name, t in tables.items()}
    except cfg.ConfigError as e:
        raise StateError(str(e)) from None


def save(path: str, tenants: dict[str, cfg.Tenant]) -> None:
    """Replace the file with these tenants, atomically. OSError (or ValueError: a tenant no
    table can say) leaves the old file as it was."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                           "tenants": {n: cfg.tenant_table(t) for n, t in sorted(tenants.items())}}
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` (0600): a reader sees the old file or the new one, never
    half; a crash keeps one of them. OSError leaves the old file as it was."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)    # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)            # the rename itself survives a crash
    finally:
        os.close(dfd)


def set_aside(path: str) -> str | None:
    """Rename an unusable file out of the way (never delete it): its new path, or None where
    it could not be moved (then it is left where it is, and still not applied)."""
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 0
    while os.path.lexists(aside if n == 0 else f"{aside}.{n}"):
        n += 1
    aside = aside if n == 0 else f"{aside}.{n}"
    try:
        os.rename(path, aside)
    except OSError:
        return None
    return aside
