"""The main job on the built-in default: a CPU-backend broker with the example quota file and
example tenants running real kernels, then what each tenant was configured for and got.

    python examples/demo.py [--seconds 8] [--config examples/quota.toml]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kubecash.broker import config as cfg  # noqa: E402
from kubecash.broker.local import LocalBroker  # noqa: E402
from kubecash.broker.scheduler import expected_shares  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(HERE, "quota.toml"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--device", default="cpu0")
    a = ap.parse_args()
    conf = cfg.load(a.config)
    print(f"starting kubecash-broker with {os.path.relpath(a.config)} on the CPU backend")
    workers: list[subprocess.Popen] = []
    with LocalBroker(config_path=a.config, log_level="WARNING") as broker:
        try:
            for t in conf.tenants:
                workers.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "tenant_worker.py"), "--seconds",
                     str(a.seconds + 2), "--device", a.device], env=broker.env(t),
                    stdout=subprocess.PIPE, text=True))
            for w in workers:                  # every tenant compiled its kernel and is ready
                w.stdout.readline()
            print(f"{len(workers)} tenants running kernels for {a.seconds:g} s ...")
            with broker.admin() as admin:
                time.sleep(1.0)                # let every queue fill before measuring
                before = admin.call("status")
                time.sleep(a.seconds)
                after = admin.call("status")
            results = [json.loads(w.communicate(timeout=120)[0].strip().splitlines()[-1])
                       for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()

    used = {t: after["tenants"][t]["devices"][a.device]["used_ns"]
            - before["tenants"][t]["devices"][a.device]["used_ns"] for t in conf.tenants}
    wall = after["uptime_s"] - before["uptime_s"]
    quotas = {t: (tc.quota_for(a.device).weight, tc.quota_for(a.device).limit)
              for t, tc in conf.tenants.items()}
    want = expected_shares(quotas)
    print(f"\n{'tenant':<8} {'weight':>6} {'limit':>6} {'memory':>9}  {'expected':>8} {'achieved':>8}"
          f" {'kernels':>8}  results")
    for t, r in zip(conf.tenants, results, strict=True):
        q = conf.tenants[t].quota_for(a.device)
        mem = "-" if q.memory is None else f"{q.memory >> 20}MiB"
        print(f"{t:<8} {q.weight:>6} {q.limit if q.limit else '-':>6} {mem:>9}  {want[t]:>8.1%}"
              f" {used[t] / 1e9 / wall:>8.1%} {r['kernels']:>8}  {'correct' if r['ok'] else 'WRONG'}")
    busy = sum(used.values()) / 1e9 / wall
    print(f"\ndevice {a.device} busy {busy:.1%} of {wall:.1f} s "
          "(shares are of device time, measured by the executors)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
