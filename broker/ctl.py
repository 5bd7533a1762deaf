"""`brokerctl`: the operator's CLI, talking to the broker's owner-only admin socket."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

import zmq

from kubecash.client import protocol as P
from kubecash.client.errors import BrokerUnavailable, KubecashError

from . import cdi
from .config import parse_size

DEFAULT_RUNTIME_DIR = "/run/kubecash"


class AdminClient:
    """Requests to the broker's admin socket. Idempotent close(), context manager."""

    def __init__(self, runtime_dir: str = DEFAULT_RUNTIME_DIR, *, socket: str | None = None,
                 timeout: float = 10.0):
        self.path = socket or os.path.join(runtime_dir, "admin.sock")
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"ipc://{self.path}")
        self._closed = False

    def call(self, op: str, **fields: Any) -> dict:
        rid = next(self._ids)
        self._sock.send(P.request(op, rid, **fields))
        while self._sock.poll(int(self.timeout * 1000)):
            msg = P.unpack(self._sock.recv())
            if msg.get("id") != rid:
                continue
            P.raise_for_reply(msg)
            P.check_reply(P.ADMIN, op, msg)
            return {k: v for k, v in msg.items() if k not in ("v", "id", "ok")}
        raise BrokerUnavailable(f"no broker answering on {self.path}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._ctx.term()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}MiB"


def format_status(st: dict) -> str:
    lines = ["DEVICE  KIND  MEMORY      BUSY(10s)  HOLDER        STATE"]
    for name, d in st["devices"].items():
        lines.append(f"{name:<7} {d['kind']:<5} {_mib(d['total_memory']):>10}  {_pct(d['busy']['10s']):>9}  "
                     f"{d['holder'] or '-':<13} {'draining' if d['draining'] else 'serving'}")
    lines.append("")
    lines.append("TENANT        DEVICE  SESS  WEIGHT  LIMIT   CLASS    SHARE(10s)  MEMORY USED/LIMIT      KERNELS")
    for tname, t in st["tenants"].items():
        for dname, d in t["devices"].items():
            lim = "-" if d["limit"] is None else f"{d['limit']:g}"
            lines.append(f"{tname:<13} {dname:<7} {t['sessions']:>4}  {d['weight']:>6}  {lim:<6}  "
                         f"{d['class']:<7}  {_pct(d['share'].get('10s')):>9}  "
                         f"{_mib(d['memory_used']):>8}/{_mib(d['memory_limit']):<10}  {d['kernels']:>9}")
    return "\n".join(lines + _state_lines(st.get("state", {})))


def _set_fields(a: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"tenant": a.tenant}
    if a.device:
        fields["device"] = a.device
    if a.weight is not None:
        fields["weight"] = a.weight
    if a.limit is not None:
        fields["limit"] = a.limit
    if a.memory is not None:
        fields["memory"] = parse_size(a.memory)
    if a.klass:
        fields["class"] = a.klass
    if len(fields) == 1 + ("device" in fields):
        raise ValueError("set: nothing to change (give --weight, --limit, --memory or --class)")
    return fields


def _value(text: str) -> Any:
    """A table value as the quota file would hold it: an integer, a number, or a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def tenant_table(a: argparse.Namespace) -> dict[str, Any]:
    """`tenant add`'s flags as the tenant's table (the broker checks it as the quota file's)."""
    table: dict[str, Any] = {}
    for key, value in (("memory", a.memory), ("weight", a.weight), ("limit", a.limit), ("class", a.klass),
                       ("max_kernel_seconds", a.max_kernel_seconds), ("owner", a.owner)):
        if value is not None:
            table[key] = value
    if a.devices is not None:
        table["devices"] = [d for d in a.devices.split(",") if d]
    for item in a.device_quota or []:
        dev, colon, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not (dev and colon and key and eq):
            raise ValueError(f"--device-quota {item!r}: expected DEVICE:FIELD=VALUE, e.g. gpu0:memory=2GiB")
        table.setdefault("device", {}).setdefault(dev, {})[key] = _value(value)
    return table


def format_tenant_list(r: dict) -> str:
    lines = ["TENANT        SOURCE   SERVED  DEFINITION"]
    for name, t in r["tenants"].items():
        table = dict(t["table"])
        per_dev = table.pop("device", {})
        desc = ", ".join([f"{k}={_mib(v) if k == 'memory' else v}" for k, v in table.items()] +
                         [f"{d}: {k}={_mib(v) if k == 'memory' else v}" for d, q in per_dev.items()
                          for k, v in q.items()]) or "(defaults)"
        lines.append(f"{name:<13} {t['source']:<8} {'yes' if t['served'] else 'no':<6}  {desc}")
    return "\n".join(lines + _state_lines(r["state"]))


def _state_lines(st: dict) -> list[str]:
    problem = st.get("problem")
    if not problem:
        return []
    where = f"set aside as {problem['set_aside']}" if problem.get("set_aside") else "left in place, unread"
    return ["", f"STATE FILE UNUSABLE at start ({where}); its dynamic tenants are not served: {problem['error']}"]


def _native_libdir() -> str:
    """The host directory of the native libraries a CDI spec mounts (they must be built)."""
    from kubecash import native
    d = native.libdir()
    missing = [n for n in native.LIBS if not os.path.isfile(os.path.join(d, n))]
    if missing:
        raise ValueError(f"{', '.join(missing)} not built in {d} (reinstall the package: its build "
                         "compiles them), or write the spec --no-libraries")
    return d


def _top(c: AdminClient, count: int | None) -> None:
    """A live view, refreshed every second until interrupted (or `count` frames)."""
    n = 0
    try:
        while count is None or n < count:
            st = c.call("status")
            sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
            sys.stdout.write(f"kubecash broker  up {st['uptime_s']:.0f}s  quantum {st['quantum_ms']:g} ms  "
                             f"{time.strftime('%H:%M:%S')}\n\n{format_status(st)}\n")
            sys.stdout.flush()
            n += 1
            if count is None or n < count:
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="brokerctl", description="Operate a KubeCASH broker")
    ap.add_argument("--runtime-dir", default=os.environ.get("KUBECASH_RUNTIME_DIR", DEFAULT_RUNTIME_DIR))
    ap.add_argument("--socket", help="admin socket path (default <runtime-dir>/admin.sock)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    # --json also after the command (`brokerctl status --json`); SUPPRESS keeps a --json given
    # before it from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *args, **kw: _add(*args, parents=[common], **kw)  # type: ignore[method-assign]
    sub.add_parser("status", help="devices and tenants at a glance")
    sub.add_parser("tenants", help="tenants and their quotas")
    sp = sub.add_parser("set", help="change a tenant's quota live")
    sp.add_argument("tenant")
    sp.add_argument("--device", help="only on this device (default: the tenant's quota)")
    sp.add_argument("--weight", type=int)
    sp.add_argument("--limit", type=float, help="fraction of device time; 0 removes the cap")
    sp.add_argument("--memory", help='e.g. "512MiB"')
    sp.add_argument("--class", dest="klass", choices=["batch", "latency"])
    ev = sub.add_parser("evict", help="end a tenant's sessions and free everything it holds")
    ev.add_argument("tenant")
    dr = sub.add_parser("drain", help="grant no new leases on a device (running work completes)")
    dr.add_argument("device")
    dr.add_argument("--undo", action="store_true", help="resume granting leases")
    sub.add_parser("reload", help="re-read the quota file (an invalid one changes nothing)")
    tn = sub.add_parser("tenant", help="dynamic tenants: add (or change), remove, list")
    tsub = tn.add_subparsers(dest="tenant_cmd", required=True)
    ta = tsub.add_parser("add", parents=[common], help="make a dynamic tenant (kept across restarts); "
                         "the fields are the quota file's")
    ta.add_argument("tenant")
    ta.add_argument("--memory", help='per device, e.g. "512MiB"')
    ta.add_argument("--weight", type=int)
    ta.add_argument("--limit", type=float, help="fraction of device time")
    ta.add_argument("--class", dest="klass", help="batch or latency")
    ta.add_argument("--max-kernel-seconds", type=float)
    ta.add_argument("--devices", help="comma-separated devices it may use (default: all)")
    ta.add_argument("--owner", help="uid[:gid] its containers run as")
    ta.add_argument("--device-quota", action="append", metavar="DEVICE:FIELD=VALUE",
                    help="a per-device override, e.g. gpu0:memory=2GiB (repeatable)")
    ta.add_argument("--replace", action="store_true", help="change it if it exists with another definition")
    tr = tsub.add_parser("remove", parents=[common], help="remove a dynamic tenant: its sessions end")
    tr.add_argument("tenant")
    tsub.add_parser("list", parents=[common], help="every tenant, where it is defined, and how")
    tp = sub.add_parser("top", help="live view, refreshed every second")
    tp.add_argument("--count", type=int, help=argparse.SUPPRESS)
    cd = sub.add_parser("cdi", help="write a CDI spec: one device per tenant")
    cd.add_argument("--output", "-o", help="file to write (default: standard output)")
    cd.add_argument("--container-runtime-dir", default="/run/kubecash",
                    help="where containers see the runtime dir (default /run/kubecash)")
    cd.add_argument("--no-libraries", action="store_true",
                    help="leave out KubeCASH's libcuda.so.1/libnvidia-ml.so.1 (cuda-python's shim only)")
    a = ap.parse_args(argv)
    try:
        with AdminClient(a.runtime_dir, socket=a.socket) as c:
            if a.cmd == "status":
                st = c.call("status")
                print(json.dumps(st, indent=2) if a.json else format_status(st))
            elif a.cmd == "tenants":
                st = c.call("status")["tenants"]
                if a.json:
                    print(json.dumps(st, indent=2))
                else:
                    for name, t in st.items():
                        devs = ", ".join(f"{d}: weight {q['weight']}, limit {q['limit'] or '-'}, "
                                         f"{q['class']}, memory {_mib(q['memory_limit'])}"
                                         for d, q in t["devices"].items())
                        src = ", dynamic" if t.get("source") == "dynamic" else ""
                        print(f"{name} ({t['sessions']} sessions{src}) {devs}")
            elif a.cmd == "set":
                r = c.call("set_quota", **_set_fields(a))
                print(json.dumps(r) if a.json else "\n".join([f"updated {r['tenant']}", *r["warnings"]]))
            elif a.cmd == "evict":
                r = c.call("evict", tenant=a.tenant)
                print(json.dumps(r) if a.json else
                      f"evicted {r['tenant']}: {r['sessions_ended']} sessions ended")
            elif a.cmd == "drain":
                r = c.call("drain", device=a.device, undo=a.undo)
                print(json.dumps(r) if a.json else
                      f"{r['device']}: {'draining' if r['draining'] else 'granting leases'}")
            elif a.cmd == "reload":
                r = c.call("reload")
                print(json.dumps(r) if a.json else
                      f"reloaded: {len(r['tenants'])} tenants (added {', '.join(r['added']) or 'none'}; "
                      f"removed {', '.join(r['removed']) or 'none'})"
                      + "".join(f"\n{w}" for w in r["warnings"]))
            elif a.cmd == "tenant" and a.tenant_cmd == "add":
                r = c.call("tenant_add", tenant=a.tenant, table=tenant_table(a), replace=a.replace)
                what = "added" if r["created"] else "changed" if r["changed"] else "unchanged"
                print(json.dumps(r) if a.json else "\n".join([f"{what} {r['tenant']}", *r["warnings"]]))
            elif a.cmd == "tenant" and a.tenant_cmd == "remove":
                r = c.call("tenant_remove", tenant=a.tenant)
                print(json.dumps(r) if a.json else
                      f"removed {r['tenant']}: {r['sessions_ended']} sessions ended")
            elif a.cmd == "tenant":
                r = c.call("tenant_list")
                print(json.dumps(r, indent=2) if a.json else format_tenant_list(r))
            elif a.cmd == "top":
                _top(c, a.count)
            elif a.cmd == "cdi":
                st = c.call("status")
                libdir = None if a.no_libraries else _native_libdir()
                doc = json.dumps(cdi.spec(st["runtime_dir"], st["tenants"], libdir=libdir,
                                          container_runtime_dir=a.container_runtime_dir), indent=2)
                if a.output:
                    tmp = a.output + ".tmp"
                    with open(tmp, "w") as f:
                        f.write(doc + "\n")
                    os.replace(tmp, a.output)     # CDI runtimes never see half a file
                    print(json.dumps({"written": a.output}) if a.json else f"wrote {a.output}")
                else:
                    print(doc)
    except (KubecashError, ValueError, OSError) as e:
        print(f"brokerctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
