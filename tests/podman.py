"""podman as the tests run it: from a Debian rootfs made by tools/rootfs.sh (no image registry
is reachable here), overlaid (`:O`) so nothing a container writes reaches the cache."""
from __future__ import annotations

import os
import shutil
import subprocess

# podman on these machines: no default ulimits it cannot set, and runc (crun is not there).
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'


def why_not(rootfs: str | None, make_target: str, needs: str = "bin/sh") -> str | None:
    """Why podman cannot run `rootfs` here, or None."""
    if not rootfs:
        return f"run by `make {make_target}` (a Debian rootfs, run in podman)"
    if os.geteuid() != 0:
        return "podman needs root here"
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if not os.path.exists(os.path.join(rootfs, needs)):
        return f"{rootfs} has no /{needs}"
    return None


class Podman:
    """`podman` with this machine's containers.conf (written under `tmp`)."""

    def __init__(self, tmp) -> None:
        conf = tmp / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if check:
            assert p.returncode == 0, f"podman {' '.join(args[:3])}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p
