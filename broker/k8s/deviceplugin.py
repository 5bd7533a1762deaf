"""The device plugin (kubelet device plugin API v1beta1), for clusters without DRA: the
extended resource `kubecash.io/share`, in units of 1/1000 of a device.

Each unit is a device ID (`<device>-<n>`); ListAndWatch lists every device's 1000, and
GetPreferredAllocation keeps a container's units on as few devices as it can. Allocate makes a
dynamic tenant for the units a container got, named from them (`dp-<hash of the IDs>`, so the
same allocation is the same tenant): on each device, `units/1000` of its time as the limit and
the same fraction of its memory (rounded down to MiB) as the memory quota; the response gives
the container `KUBECASH_BROKER` and a bind mount of the tenant's directory, no device nodes.
Memory is not a resource of its own here: the API allocates each resource separately and tells
the plugin nothing of the container, so two resources could not be joined into one tenant (DRA
claims carry both; see claims.py).

The kubelet never says when an allocation is released: `release_unused` asks its
PodResources API which units containers hold and removes the tenants no container holds (one
made in the last `grace` seconds is kept: the kubelet records an allocation only after
Allocate has answered).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from fractions import Fraction
from typing import Any

import grpc

from kubecash.client import protocol as P

from ..ctl import AdminClient
from .proto import deviceplugin_v1beta1_pb2 as dp
from .proto import deviceplugin_v1beta1_pb2_grpc as dp_grpc
from .proto import podresources_v1_pb2 as pr

log = logging.getLogger("kubecash.dra")

RESOURCE = "kubecash.io/share"
UNITS = 1000                       # per device
TENANT_PREFIX = "dp-"
API_VERSION = "v1beta1"
DEFAULT_DIR = "/var/lib/kubelet/device-plugins"
SOCKET_NAME = "kubecash.io-share.sock"


def unit_ids(device: str) -> list[str]:
    return [f"{device}-{n:04d}" for n in range(UNITS)]


def tenant_for(ids: list[str]) -> str:
    return TENANT_PREFIX + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]


def table_for(ids: list[str], devices: dict[str, int]) -> dict[str, Any]:
    """The tenant's table for these units; ValueError for an ID this plugin did not list."""
    counts: dict[str, int] = {}
    for i in ids:
        dev, _, n = i.rpartition("-")
        if dev not in devices or not n.isdigit() or not 0 <= int(n) < UNITS:
            raise ValueError(f"unit {i!r} is not one of this node's {RESOURCE} units")
        counts[dev] = counts.get(dev, 0) + 1
    per_device = {}
    for dev, n in counts.items():
        share = Fraction(n, UNITS)
        per_device[dev] = {} if share == 1 else {
            "limit": float(share), "memory": int(share * devices[dev]) >> 20 << 20}
    return {"devices": sorted(counts), "device": per_device}


class DevicePluginService(dp_grpc.DevicePluginServicer):
    def __init__(self, admin: Callable[[], AdminClient], container_runtime_dir: str = "/run/kubecash"):
        self.admin, self.container_runtime_dir = admin, container_runtime_dir
        with admin() as a:
            st = a.call("status")
        self.runtime_dir = st["runtime_dir"]
        self.devices = {n: int(d["total_memory"]) for n, d in st["devices"].items()}
        self.made: dict[str, float] = {}          # tenant -> when Allocate made it (this process)
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def GetDevicePluginOptions(self, request, context):  # the names are the proto's
        return dp.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request, context):
        yield dp.ListAndWatchResponse(devices=[dp.Device(ID=i, health="Healthy")
                                               for d in sorted(self.devices) for i in unit_ids(d)])
        # the device set is fixed while the broker runs; the stream stays open until either end goes
        while not self.stopped.wait(1.0) and context.is_active():
            pass

    def GetPreferredAllocation(self, request, context):
        resp = dp.PreferredAllocationResponse()
        for c in request.container_requests:
            chosen = list(c.must_include_deviceIDs)
            by_device: dict[str, list[str]] = {}
            for i in c.available_deviceIDs:
                if i not in chosen:
                    by_device.setdefault(i.rpartition("-")[0], []).append(i)
            # the fullest devices first: a container's units on one device where they fit
            for _, ids in sorted(by_device.items(), key=lambda kv: -len(kv[1])):
                chosen += ids[:max(0, c.allocation_size - len(chosen))]
            resp.container_responses.add(deviceIDs=chosen[:max(c.allocation_size, len(c.must_include_deviceIDs))])
        return resp

    def Allocate(self, request, context):
        resp = dp.AllocateResponse()
        with self._lock, self.admin() as a:
            for c in request.container_requests:
                ids = list(c.devices_ids)
                try:
                    tenant = tenant_for(ids)
                    a.call("tenant_add", tenant=tenant, table=table_for(ids, self.devices), replace=True)
                except Exception as e:     # the API has no per-container error: the whole call fails
                    log.warning("allocate %s: %s", ids[:3], e)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot allocate {len(ids)} {RESOURCE} "
                                  f"units: {e}")
                self.made[tenant] = time.monotonic()
                inside = P.tenant_dir(self.container_runtime_dir, tenant)
                resp.container_responses.add(
                    envs={"KUBECASH_BROKER": f"ipc://{P.broker_socket_path(self.container_runtime_dir, tenant)}"},
                    mounts=[dp.Mount(container_path=inside, host_path=P.tenant_dir(self.runtime_dir, tenant),
                                     read_only=False)])
                log.info("allocate %d units: tenant %s", len(ids), tenant)
        return resp

    def PreStartContainer(self, request, context):
        return dp.PreStartContainerResponse()

    def release_unused(self, pod_resources: Any, grace: float = 60.0) -> list[str]:
        """Remove the dp- tenants no container holds (PodResourcesLister.List, the kubelet's
        view); returns their names."""
        held = set()
        for pod in pod_resources.List(pr.ListPodResourcesRequest(), timeout=10).pod_resources:
            for c in pod.containers:
                ids = [i for d in c.devices if d.resource_name == RESOURCE for i in d.device_ids]
                if ids:
                    held.add(tenant_for(ids))
        removed = []
        now = time.monotonic()
        with self._lock, self.admin() as a:
            for name, t in a.call("tenant_list")["tenants"].items():
                if (name.startswith(TENANT_PREFIX) and t["source"] == "dynamic" and name not in held
                        and now - self.made.get(name, -1e18) > grace):
                    a.call("tenant_remove", tenant=name)
                    self.made.pop(name, None)
                    removed.append(name)
        for name in removed:
            log.info("released: tenant %s (no container holds its units)", name)
        return removed


class DevicePlugin:
    """The service on `<plugin_dir>/kubecash.io-share.sock`, registered with the kubelet on
    `<plugin_dir>/kubelet.sock`. stop() is idempotent."""

    def __init__(self, service: DevicePluginService, plugin_dir: str = DEFAULT_DIR):
        self.service, self.plugin_dir = service, plugin_dir
        self.socket = os.path.join(plugin_dir, SOCKET_NAME)
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        dp_grpc.add_DevicePluginServicer_to_server(service, self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def register(self, timeout: float = 10.0) -> None:
        """Register with the kubelet; grpc.RpcError if it refuses (the plugin should then exit)."""
        with grpc.insecure_channel(f"unix://{os.path.join(self.plugin_dir, 'kubelet.sock')}") as ch:
            dp_grpc.RegistrationStub(ch).Register(dp.RegisterRequest(
                version=API_VERSION, endpoint=SOCKET_NAME, resource_name=RESOURCE,
                options=dp.DevicePluginOptions(get_preferred_allocation_available=True)), timeout=timeout)

    def stop(self) -> None:
        if not self.service.stopped.is_set():
            self.service.stopped.set()
            self.server.stop(1.0).wait()
            try:
                os.unlink(self.socket)
            except FileNotFoundError:
                pass
