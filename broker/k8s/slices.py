"""What the driver publishes: a ResourceSlice of this node's devices and the DeviceClass
`kubecash.io` (`resource.k8s.io/v1`), as the API's JSON.

Each broker device is one device of the node's pool (the pool is named after the node), with
`allowMultipleAllocations` and two consumable capacities: `share`, the device's time (1 = the
whole device; any multiple of 1/10000 from 1/10000 up: the broker's smallest limit), and
`memory` (bytes, in steps of 1 MiB). A request that names no capacity gets the whole device,
as an exclusive allocation would. Objects are plain dicts: they are what the API server sees
(tests check them against the kubernetes client's models, extra fields forbidden).
Publishing needs a live cluster; ApiPublisher does it through the official client, and the
plugin takes any object with the same `publish` (tests record what would be sent).
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Protocol

from . import DRIVER, claims, quantity

log = logging.getLogger("kubecash.dra")

API_VERSION = "resource.k8s.io/v1"
SHARE_STEP = Fraction(1, 10000)
MEMORY_STEP = 1 << 20
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")   # a device's name in a slice
_ATTRIBUTE_STRING_MAX = 64


def _capacity(total: Fraction | int, step: Fraction | int) -> dict[str, Any]:
    top = quantity.render(total)
    return {"value": top, "requestPolicy": {"default": top, "validRange": {
        "min": quantity.render(step), "max": top, "step": quantity.render(step)}}}


def device(d: dict[str, Any]) -> dict[str, Any]:
    """One broker device (an entry of the broker's status `devices`) as a slice's device."""
    name = d["name"]
    if not _DNS_LABEL.match(name):
        raise ValueError(f"device {name!r} cannot be named in a ResourceSlice (a DNS label: a-z, 0-9, -)")
    memory = int(d["total_memory"]) // MEMORY_STEP * MEMORY_STEP   # the policy's max is a multiple of its step
    if memory < 2 * MEMORY_STEP:
        raise ValueError(f"device {name}: {d['total_memory']} bytes of memory is too little to share")
    attributes: dict[str, Any] = {"kind": {"string": str(d["kind"])}, "index": {"int": int(d["index"])}}
    for key in ("model", "uuid"):
        if isinstance(d.get(key), str) and d[key]:
            attributes[key] = {"string": d[key][:_ATTRIBUTE_STRING_MAX]}
    return {"name": name, "allowMultipleAllocations": True, "attributes": attributes,
            "capacity": {"share": _capacity(Fraction(1), SHARE_STEP), "memory": _capacity(memory, MEMORY_STEP)}}


def resource_slice(node: str, devices: dict[str, dict[str, Any]], generation: int = 1) -> dict[str, Any]:
    """The node's one slice (its pool holds every device of this node). Devices that cannot be
    published are left out and logged."""
    out = []
    for _, d in sorted(devices.items()):
        try:
            out.append(device(d))
        except (KeyError, TypeError, ValueError) as e:
            log.error("device %s is not published: %s", d.get("name"), e)
    return {"apiVersion": API_VERSION, "kind": "ResourceSlice",
            "metadata": {"name": f"{node}-{DRIVER}", "labels": {"app.kubernetes.io/managed-by": DRIVER}},
            "spec": {"driver": DRIVER, "nodeName": node,
                     "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
                     "devices": out}}


def device_class(owner: str | None = None) -> dict[str, Any]:
    """The DeviceClass `kubecash.io`, or with `owner` ("uid:gid") `uid-<uid>.kubecash.io`:
    its claims' tenants are that owner's, for pods running as it (a non-root pod with no
    capability can reach only a tenant directory its uid owns)."""
    spec: dict[str, Any] = {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]}
    if owner is None:
        return {"apiVersion": API_VERSION, "kind": "DeviceClass", "metadata": {"name": DRIVER}, "spec": spec}
    spec["config"] = [{"opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": claims.CONFIG_API_VERSION, "kind": claims.CONFIG_KIND, "owner": owner}}}]
    return {"apiVersion": API_VERSION, "kind": "DeviceClass",
            "metadata": {"name": f"uid-{owner.partition(':')[0]}.{DRIVER}"}, "spec": spec}


class Publisher(Protocol):
    def publish(self, slices: list[dict[str, Any]]) -> int: ...


class ApiPublisher:
    """Creates or replaces the node's slices, deletes its others (a live cluster only).
    What it wrote is remembered with the server's resourceVersion: a slice the server still
    has at that version, with the same content, is left alone (the server may add defaults,
    so its copy is not compared); one deleted or changed by another is written again."""

    def __init__(self, node: str, api_client: Any = None):
        from kubernetes import client
        self.node, self.api = node, client.ResourceV1Api(api_client)
        self._written: dict[str, tuple[dict[str, Any], str]] = {}    # name -> (body, resourceVersion)

    def publish(self, slices: list[dict[str, Any]]) -> int:
        """Makes the server's slices of this node `slices`; returns how many writes it took."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        existing = {s.metadata.name: s for s in self.api.list_resource_slice(
            field_selector=f"spec.nodeName={self.node},spec.driver={DRIVER}").items}
        writes = 0
        for body in slices:
            name = body["metadata"]["name"]
            have = existing.pop(name, None)
            version = have.metadata.resource_version if have is not None else None
            if have is not None and self._written.get(name) == (body, version):
                continue
            if have is not None:
                out = self.api.replace_resource_slice(name, client.V1ResourceSlice.from_dict(
                    {**body, "metadata": {**body["metadata"], "resourceVersion": version}}))
            else:
                out = self.api.create_resource_slice(client.V1ResourceSlice.from_dict(body))
            self._written[name] = (body, out.metadata.resource_version)
            writes += 1
        for name in existing:
            self._written.pop(name, None)
            try:
                self.api.delete_resource_slice(name)
                writes += 1
            except ApiException as e:
                if e.status != 404:
                    raise
        return writes


def keep_published(publisher: Publisher, build: Callable[[], list[dict[str, Any]]], stop: threading.Event,
                   interval: float) -> None:
    """Publishes what `build()` returns (the slices of the broker's devices now) every
    `interval` seconds until `stop`: a slice deleted, an API server that was down at start, a
    broker whose devices changed, all heal by the next pass. A failed pass is logged and
    tried again sooner (1 s, doubling up to `interval`)."""
    retry = 1.0
    while not stop.is_set():
        try:
            if publisher.publish(build()):
                log.info("published the node's ResourceSlice")
            retry, wait = 1.0, interval
        except Exception as e:  # the API client and the admin socket raise many kinds
            log.error("the ResourceSlice was not published (again in %g s): %s", min(retry, interval), e)
            wait, retry = min(retry, interval), retry * 2
        stop.wait(wait)
