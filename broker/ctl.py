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
    return "\n".join(lines)


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
    tp = sub.add_parser("top", help="live view, refreshed every second")
    tp.add_argument("--count", type=int, help=argparse.SUPPRESS)
    cd = sub.add_parser("cdi", help="write a CDI spec: one device per tenant")
    cd.add_argument("--output", "-o", help="file to write (default: standard output)")
    cd.add_argument("--container-runtime-dir", default="/run/kubecash",
                    help="where containers see the runtime dir (default /run/kubecash)")
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
                        print(f"{name} ({t['sessions']} sessions) {devs}")
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
            elif a.cmd == "top":
                _top(c, a.count)
            elif a.cmd == "cdi":
                st = c.call("status")
                doc = json.dumps(cdi.spec(st["runtime_dir"], st["tenants"],
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
