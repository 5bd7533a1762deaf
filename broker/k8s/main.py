"""`kubecash-dra`: the DRA driver's kubelet plugin, beside the broker on a node.

Reconciles the claims it had prepared, serves registration and the DRA API on the kubelet's
sockets, keeps the node's ResourceSlice published (unless --no-publish: checked every
--publish-interval seconds, written again where it is missing or out of date), and runs until SIGTERM or
SIGINT. Claims come from the API server (in-cluster credentials, or --kubeconfig), or from a
directory of claim files (--claims-dir: a node with no API server, and the tests).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from kubecash.client.errors import KubecashError

from ..ctl import DEFAULT_RUNTIME_DIR, AdminClient
from . import DRIVER, servers, slices
from .driver import Driver
from .records import Records
from .sources import ApiClaims, ClaimSource, FileClaims

log = logging.getLogger("kubecash.dra")


def _api_client(kubeconfig: str | None):
    from kubernetes import client, config
    if kubeconfig:
        config.load_kube_config(kubeconfig)
    else:
        config.load_incluster_config()
    return client.ApiClient()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubecash-dra", description=f"the {DRIVER} DRA driver's kubelet plugin")
    ap.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                    help="this node (default $NODE_NAME): the pool of its devices")
    ap.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR, help="the broker's runtime directory")
    ap.add_argument("--admin-socket", help="the broker's admin socket (default <runtime-dir>/admin.sock)")
    ap.add_argument("--state-dir", default="/var/lib/kubecash/dra", help="where prepared claims are recorded")
    ap.add_argument("--cdi-dir", default="/var/run/cdi", help="where CDI specs for prepared claims go")
    ap.add_argument("--container-runtime-dir", default="/run/kubecash",
                    help="where a container sees the broker's runtime directory")
    ap.add_argument("--registry-dir", default=servers.DEFAULT_REGISTRY_DIR, help="the kubelet's plugins_registry")
    ap.add_argument("--plugins-dir", default=servers.DEFAULT_PLUGINS_DIR, help="the kubelet's plugins directory")
    ap.add_argument("--kubelet-plugins-dir", help="the plugins directory as the kubelet sees it, where it is "
                    "mounted elsewhere in this container (default: --plugins-dir)")
    ap.add_argument("--claims-dir", help="read claims from <dir>/<namespace>/<name>.json, not the API server")
    ap.add_argument("--kubeconfig", help="credentials for the API server (default: in-cluster)")
    ap.add_argument("--no-publish", action="store_true", help="do not publish the node's ResourceSlice")
    ap.add_argument("--publish-interval", type=float, default=30.0,
                    help="seconds between checks that the node's ResourceSlice is published as it should be")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not a.node_name:
        ap.error("--node-name (or $NODE_NAME) is needed: it names this node's pool")
    if not a.publish_interval > 0:
        ap.error(f"--publish-interval {a.publish_interval:g}: it must be above 0 seconds")

    def admin() -> AdminClient:
        return AdminClient(a.runtime_dir, socket=a.admin_socket)

    api = None
    try:
        if a.claims_dir is None or not a.no_publish:
            api = _api_client(a.kubeconfig)
    except Exception as e:  # the config loaders raise several kinds
        print(f"kubecash-dra: no API server credentials: {e} (--claims-dir and --no-publish run without)",
              file=sys.stderr)
        return 2
    claims: ClaimSource = FileClaims(a.claims_dir) if a.claims_dir else ApiClaims(api)
    driver = Driver(claims, Records(a.state_dir), pool=a.node_name, cdi_dir=a.cdi_dir, admin=admin,
                    container_runtime_dir=a.container_runtime_dir)
    try:
        driver.reconcile()
    except KubecashError as e:      # serve anyway: claims get errors until the broker answers
        log.error("cannot reconcile prepared claims now: %s", e)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    publishing = None
    if not a.no_publish:
        def build() -> list[dict]:
            with admin() as c:
                return [slices.resource_slice(a.node_name, c.call("status")["devices"])]
        publishing = threading.Thread(target=slices.keep_published, name="kubecash-dra-publish", daemon=True,
                                      args=(slices.ApiPublisher(a.node_name, api), build, stop,
                                            a.publish_interval))
        publishing.start()
    plugin = servers.Plugin(driver, registry_dir=a.registry_dir, plugins_dir=a.plugins_dir,
                            kubelet_plugins_dir=a.kubelet_plugins_dir)
    log.info("serving %s on %s (registration %s)", DRIVER, plugin.endpoint, plugin.registration_socket)
    try:
        stop.wait()
    finally:
        plugin.stop()
        if publishing is not None:
            publishing.join(10)
    return 0


def device_plugin_main(argv: list[str] | None = None) -> int:
    """`kubecash-device-plugin`: kubecash.io/share for clusters without DRA (deviceplugin.py)."""
    import grpc

    from . import deviceplugin
    from .proto import podresources_v1_pb2_grpc as pr_grpc
    ap = argparse.ArgumentParser(prog="kubecash-device-plugin",
                                 description=f"the {deviceplugin.RESOURCE} device plugin")
    ap.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR, help="the broker's runtime directory")
    ap.add_argument("--admin-socket", help="the broker's admin socket (default <runtime-dir>/admin.sock)")
    ap.add_argument("--plugin-dir", default=deviceplugin.DEFAULT_DIR, help="the kubelet's device-plugins directory")
    ap.add_argument("--pod-resources-socket", default="/var/lib/kubelet/pod-resources/kubelet.sock")
    ap.add_argument("--container-runtime-dir", default="/run/kubecash",
                    help="where a container sees the broker's runtime directory")
    ap.add_argument("--release-interval", type=float, default=30.0,
                    help="seconds between looks for released allocations")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        service = deviceplugin.DevicePluginService(lambda: AdminClient(a.runtime_dir, socket=a.admin_socket),
                                                   container_runtime_dir=a.container_runtime_dir)
    except KubecashError as e:
        print(f"kubecash-device-plugin: {e}", file=sys.stderr)
        return 1
    plugin = deviceplugin.DevicePlugin(service, a.plugin_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        plugin.register()
    except grpc.RpcError as e:      # the API's rule: a refused plugin exits
        print(f"kubecash-device-plugin: the kubelet refused the registration: {e}", file=sys.stderr)
        plugin.stop()
        return 1
    pods = pr_grpc.PodResourcesListerStub(grpc.insecure_channel(f"unix://{a.pod_resources_socket}"))
    try:
        while not stop.wait(a.release_interval):
            if not os.path.exists(plugin.socket):
                # a restarting kubelet removes every plugin socket: start again to register again
                log.warning("the kubelet removed %s: exiting to register anew", plugin.socket)
                return 1
            try:
                service.release_unused(pods)
            except (grpc.RpcError, KubecashError) as e:
                log.warning("cannot look for released allocations now: %s", e)
    finally:
        plugin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
