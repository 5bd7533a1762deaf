"""Container Device Interface specs: one CDI device per tenant.

`--device kubecash.io/tenant=alice` in a CDI-aware runtime (containerd, CRI-O, podman) then
gives a container alice's share and nothing else: the env var pointing at her broker socket
and a bind mount of her socket directory (which also holds the shared-memory segments her
executors create). The tenant's identity is that directory: no other tenant's is mounted.
Every device of the spec also brings KubeCASH's own libcuda.so.1 and libnvidia-ml.so.1 (the
`kubecash-libdir` directory, read-only at LIBDIR_IN_CONTAINER) with LD_LIBRARY_PATH pointing
the loader there, so any CUDA program in the container is brokered; no device node is given.
CDI replaces a variable the image sets: LD_LIBRARY_PATH also names the directories NVIDIA's
CUDA images put there (their libraries are found as before).

A spec says the lowest `cdiVersion` its content needs, by the rules of the CDI reference
library (tags.cncf.io/container-device-interface, specs-go/version.go,
MinimumRequiredVersion): runtimes built on an older library refuse versions they do not
know (podman 4.3 refuses 1.0.0 and 0.6.0, 5.4 refuses 1.0.0), and accept a spec at the
version its content needs. So the devices carry no annotations (0.6.0): nothing reads them.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from kubecash.client import protocol as P

KIND = "kubecash.io/tenant"
LIBDIR_IN_CONTAINER = "/usr/local/lib/kubecash"
IMAGE_LIBRARY_PATH = "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"   # NVIDIA's CUDA images' own value
_CDI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")   # CDI's rule for device names


class CdiError(ValueError):
    pass


def _edits(spec: dict) -> list[dict]:
    """The spec's container edits and each device's."""
    return [spec.get("containerEdits") or {}, *((d.get("containerEdits") or {}) for d in (spec.get("devices") or []))]


def _needs_110(spec: dict) -> bool:      # network devices; Intel RDT schemata or monitoring
    return any(e.get("netDevices") or (e.get("intelRdt") or {}).get("schemata") is not None
               or (e.get("intelRdt") or {}).get("enableMonitoring") for e in _edits(spec))


def _needs_070(spec: dict) -> bool:      # Intel RDT; additional GIDs
    return any(e.get("intelRdt") is not None or e.get("additionalGids") for e in _edits(spec))


def _needs_060(spec: dict) -> bool:      # annotations (spec or device); a dot in the kind's class
    _, slash, klass = spec.get("kind", "").partition("/")
    return bool(spec.get("annotations") or any(d.get("annotations") for d in (spec.get("devices") or []))
                or slash and "." in klass)


def _needs_050(spec: dict) -> bool:      # a device name starting with a digit; a device node's hostPath
    return (any(d.get("name", "")[:1] in tuple("0123456789") for d in (spec.get("devices") or []))
            or any(n.get("hostPath") for e in _edits(spec) for n in (e.get("deviceNodes") or [])))


def _needs_040(spec: dict) -> bool:      # a mount's type
    return any(m.get("type") for e in _edits(spec) for m in (e.get("mounts") or []))


# Newest first, as the reference library checks them. 1.0.0 and 0.8.0 added no content (they
# moved and removed library functions), so no spec needs them; 0.3.0 is the earliest it reads.
# Up to 1.1.0, the schema tests validate against (../shared/cdi-schema).
VERSIONS: tuple[tuple[str, Callable[[dict], Any] | None], ...] = (
    ("1.1.0", _needs_110), ("0.7.0", _needs_070), ("0.6.0", _needs_060), ("0.5.0", _needs_050),
    ("0.4.0", _needs_040), ("0.3.0", None))


def minimum_version(spec: dict) -> str:
    """The lowest cdiVersion that can carry `spec` (a CDI spec as JSON data)."""
    return next(v for v, needs in VERSIONS if needs is None or needs(spec))


def spec(runtime_dir: str, tenants: Iterable[str], *,
         container_runtime_dir: str = "/run/kubecash", libdir: str | None = None) -> dict:
    """The spec for `tenants`; `libdir`: the host directory of the native libraries
    (kubecash.native.libdir()), mounted into every container, or None to leave them out."""
    devices = []
    for name in tenants:
        if not _CDI_NAME.match(name):
            raise CdiError(f"tenant '{name}' cannot be a CDI device name (it must start with a "
                           "letter or digit)")
        inside = P.tenant_dir(container_runtime_dir, name)
        devices.append({
            "name": name,
            "containerEdits": {
                "env": [f"KUBECASH_BROKER=ipc://{P.broker_socket_path(container_runtime_dir, name)}"],
                "mounts": [{"hostPath": P.tenant_dir(runtime_dir, name), "containerPath": inside,
                            "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]}],
            },
        })
    doc: dict[str, Any] = {"cdiVersion": "", "kind": KIND, "devices": devices}
    if libdir is not None:
        doc["containerEdits"] = {
            "env": [f"LD_LIBRARY_PATH={LIBDIR_IN_CONTAINER}:{IMAGE_LIBRARY_PATH}"],
            # exec stays allowed: the loader maps the libraries' code from this mount
            "mounts": [{"hostPath": libdir, "containerPath": LIBDIR_IN_CONTAINER,
                        "options": ["rbind", "ro", "nosuid", "nodev"]}],
        }
    doc["cdiVersion"] = minimum_version(doc)
    return doc
