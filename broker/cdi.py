"""Container Device Interface specs: one CDI device per tenant.

`--device kubecash.io/tenant=alice` in a CDI-aware runtime (containerd, CRI-O, podman) then
gives a container alice's share and nothing else: the env var pointing at her broker socket
and a bind mount of her socket directory (which also holds the shared-memory segments her
executors create). The tenant's identity is that directory: no other tenant's is mounted.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from kubecash.client import protocol as P

CDI_VERSION = "1.0.0"
KIND = "kubecash.io/tenant"
_CDI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")   # CDI's rule for device names


class CdiError(ValueError):
    pass


def spec(runtime_dir: str, tenants: Iterable[str], *,
         container_runtime_dir: str = "/run/kubecash") -> dict:
    devices = []
    for name in tenants:
        if not _CDI_NAME.match(name):
            raise CdiError(f"tenant '{name}' cannot be a CDI device name (it must start with a "
                           "letter or digit)")
        inside = P.tenant_dir(container_runtime_dir, name)
        devices.append({
            "name": name,
            "annotations": {"kubecash.io/tenant": name},
            "containerEdits": {
                "env": [f"KUBECASH_BROKER=ipc://{P.broker_socket_path(container_runtime_dir, name)}"],
                "mounts": [{"hostPath": P.tenant_dir(runtime_dir, name), "containerPath": inside,
                            "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]}],
            },
        })
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices}
