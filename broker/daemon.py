"""`kubecash-broker`: the per-node daemon."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import config as cfg
from . import confine, malloc
from .devices import discover
from .server import Broker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubecash-broker",
                                 description="KubeCASH broker: shares this node's accelerators "
                                             "among tenants by time and memory quotas")
    ap.add_argument("--config", help="quota file (TOML)")
    ap.add_argument("--config-reference", action="store_true",
                    help="print every quota-file field with its default and meaning, and exit")
    ap.add_argument("--runtime-dir", help="override [broker] runtime_dir")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    if a.config_reference:
        sys.stdout.write(cfg.reference())
        return 0
    if not a.config:
        ap.error("--config is required")
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    malloc.small_buffers_by_mmap()     # see broker/malloc.py
    try:
        # cpu_devices (a setting) says how many devices there are, which bounds the limits:
        # read the settings first, then check the whole file against the devices found.
        devices = discover(cfg.load(a.config).broker.cpu_devices)
        config = cfg.load(a.config, device_count=len(devices))
    except cfg.ConfigError as e:
        print(f"kubecash-broker: {e}", file=sys.stderr)
        return 2
    if a.runtime_dir:
        import dataclasses
        config = dataclasses.replace(config, broker=dataclasses.replace(
            config.broker, runtime_dir=a.runtime_dir))
    if confine.can_confine():
        why = confine.probe()
        if why:
            print(f"kubecash-broker: {why}", file=sys.stderr)
            return 2
    broker = Broker(config, devices)

    def stop(*_):
        broker.stopping = True
    def reload(*_):
        broker.reload_requested = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    broker.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
