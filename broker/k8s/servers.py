"""The kubelet's gRPC services on unix sockets, speaking the published protos (`proto/`):
plugin registration (`<registry_dir>/kubecash.io-reg.sock`, which the kubelet's plugin
watcher finds) and the DRA plugin API v1 (`<plugins_dir>/kubecash.io/dra.sock`, the endpoint
registration names).

The kubelet (pkg/kubelet/cm/dra/plugin) reads `supported_versions` as the gRPC services
the plugin offers, named "<proto package's last part>.<service>": "v1.DRAPlugin" is the
v1 DRAPlugin (k8s.io/kubelet/pkg/apis/dra/v1: DRAPluginService).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent import futures

import grpc

from . import DRIVER
from .claims import ClaimRef
from .driver import Driver
from .proto import dra_v1_pb2 as dra
from .proto import dra_v1_pb2_grpc as dra_grpc
from .proto import pluginregistration_v1_pb2 as reg
from .proto import pluginregistration_v1_pb2_grpc as reg_grpc

log = logging.getLogger("kubecash.dra")

DRA_PLUGIN_TYPE = "DRAPlugin"          # registerapi.DRAPlugin
SUPPORTED_SERVICES = ("v1.DRAPlugin",)
DEFAULT_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_PLUGINS_DIR = "/var/lib/kubelet/plugins"


def _refs(claims) -> list[ClaimRef]:
    return [ClaimRef(c.namespace, c.name, c.uid) for c in claims]


class DraService(dra_grpc.DRAPluginServicer):
    def __init__(self, driver: Driver):
        self.driver = driver

    def NodePrepareResources(self, request, context):  # the names are the proto's
        resp = dra.NodePrepareResourcesResponse()
        for uid, o in self.driver.prepare(_refs(request.claims)).items():
            entry = resp.claims[uid]
            if o.error:
                entry.error = o.error
                continue
            for r in o.results:
                # a subrequest's result ("req/sub") is for the request containers name ("req")
                d = entry.devices.add(request_names=[r.request.split("/")[0]], pool_name=r.pool, device_name=r.device,
                                      cdi_device_ids=o.cdi_ids)
                if r.share_id is not None:
                    d.share_id = r.share_id
        return resp

    def NodeUnprepareResources(self, request, context):
        resp = dra.NodeUnprepareResourcesResponse()
        for uid, err in self.driver.unprepare(_refs(request.claims)).items():
            resp.claims[uid].error = err
        return resp


class RegistrationService(reg_grpc.RegistrationServicer):
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.registered = threading.Event()
        self.status: tuple[bool, str] | None = None

    def GetInfo(self, request, context):
        return reg.PluginInfo(type=DRA_PLUGIN_TYPE, name=DRIVER, endpoint=self.endpoint,
                              supported_versions=list(SUPPORTED_SERVICES))

    def NotifyRegistrationStatus(self, request, context):
        self.status = (request.plugin_registered, request.error)
        if request.plugin_registered:
            log.info("registered with the kubelet")
            self.registered.set()
        else:       # the kubelet retries when the socket is made again: a restart does that
            log.error("the kubelet refused the registration: %s", request.error or "(no reason given)")
        return reg.RegistrationStatusResponse()


def _listen(service_adder, servicer, path: str) -> grpc.Server:
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    try:
        os.unlink(path)          # an earlier instance's socket: the kubelet must see a new one
    except FileNotFoundError:
        pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_adder(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


class Plugin:
    """Both services, serving until stop() (idempotent)."""

    def __init__(self, driver: Driver, *, registry_dir: str = DEFAULT_REGISTRY_DIR,
                 plugins_dir: str = DEFAULT_PLUGINS_DIR, kubelet_plugins_dir: str | None = None):
        self.endpoint = os.path.join(plugins_dir, DRIVER, "dra.sock")
        self.registration_socket = os.path.join(registry_dir, f"{DRIVER}-reg.sock")
        # the endpoint as the kubelet dials it: the plugins directory may be mounted elsewhere here
        self.registration = RegistrationService(os.path.join(kubelet_plugins_dir or plugins_dir, DRIVER, "dra.sock"))
        # the DRA socket first: the kubelet connects to it as soon as it has registered
        self._servers = [_listen(dra_grpc.add_DRAPluginServicer_to_server, DraService(driver), self.endpoint),
                         _listen(reg_grpc.add_RegistrationServicer_to_server, self.registration,
                                 self.registration_socket)]

    def stop(self, grace: float = 2.0) -> None:
        servers, self._servers = self._servers, []
        for s in reversed(servers):      # unregister first: the watcher sees the socket go
            s.stop(grace).wait()
        for path in (self.registration_socket, self.endpoint) if servers else ():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
