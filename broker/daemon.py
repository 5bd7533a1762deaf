"""`kubecash-broker`: the per-node daemon."""
from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import sys

from . import config as cfg
from .devices import discover
from .server import Broker


M_MMAP_THRESHOLD = -3     # glibc mallopt()


def _steady_malloc() -> None:
    """The broker lives for months while clients connect and go. ZeroMQ's I/O thread gives
    each connection buffers of 8-16 KiB; in glibc's arena for that thread their churn keeps
    touching new pages for many minutes (bench/soak.py showed it as slow RSS growth). Served
    by mmap instead (a fixed 4 KiB threshold), they go back to the system when freed. The
    broker moves no bulk data, so the extra system calls cost nothing that matters. A no-op
    where the C library is not glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 4096)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubecash-broker",
                                 description="KubeCASH broker: shares this node's accelerators "
                                             "among tenants by time and memory quotas")
    ap.add_argument("--config", required=True, help="quota file (TOML)")
    ap.add_argument("--runtime-dir", help="override [broker] runtime_dir")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _steady_malloc()
    devices = discover()
    try:
        config = cfg.load(a.config, device_count=len(devices))
    except cfg.ConfigError as e:
        print(f"kubecash-broker: {e}", file=sys.stderr)
        return 2
    if a.runtime_dir:
        import dataclasses
        config = dataclasses.replace(config, broker=dataclasses.replace(
            config.broker, runtime_dir=a.runtime_dir))
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
