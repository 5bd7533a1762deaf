"""The device plugin (kubecash.io/share, API v1beta1): the kubelet's side played over real
gRPC from the published protos (its Registration and PodResources services, the device
plugin's client) against a real broker and a real client process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed: the kubernetes extra (pip install "
                                          "'kubecash[kubernetes]') is needed for the device plugin's tests")
from conftest import ROOT, wait_for  # noqa: E402

from kubecash.broker.ctl import AdminClient  # noqa: E402
from kubecash.broker.k8s import deviceplugin  # noqa: E402
from kubecash.broker.k8s.proto import deviceplugin_v1beta1_pb2 as dp  # noqa: E402
from kubecash.broker.k8s.proto import deviceplugin_v1beta1_pb2_grpc as dp_grpc  # noqa: E402
from kubecash.broker.k8s.proto import podresources_v1_pb2 as pr  # noqa: E402
from kubecash.broker.k8s.proto import podresources_v1_pb2_grpc as pr_grpc  # noqa: E402

MiB = 1 << 20


class Kubelet(dp_grpc.RegistrationServicer, pr_grpc.PodResourcesListerServicer):
    """The kubelet's Registration (kubelet.sock) and PodResources services."""

    def __init__(self, plugin_dir: str):
        self.registered: list = []
        self.pods: list = []            # PodResources as List returns them
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dp_grpc.add_RegistrationServicer_to_server(self, self.server)
        pr_grpc.add_PodResourcesListerServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{os.path.join(plugin_dir, 'kubelet.sock')}")
        self.server.start()

    def Register(self, request, context):
        self.registered.append(request)
        return dp.Empty()

    def List(self, request, context):
        return pr.ListPodResourcesResponse(pod_resources=self.pods)


@pytest.fixture
def setup(broker):
    d = tempfile.mkdtemp(prefix="kc-dp-", dir="/tmp")
    kubelet = Kubelet(d)

    def admin():
        return AdminClient(broker.runtime_dir)
    plugin = deviceplugin.DevicePlugin(deviceplugin.DevicePluginService(
        admin, container_runtime_dir=broker.runtime_dir), d)
    ch = grpc.insecure_channel(f"unix://{plugin.socket}")
    yield kubelet, plugin, dp_grpc.DevicePluginStub(ch), pr_grpc.PodResourcesListerStub(
        grpc.insecure_channel(f"unix://{os.path.join(d, 'kubelet.sock')}"))
    ch.close()
    plugin.stop()
    kubelet.server.stop(0)


CLIENT = """
    import kubecash.client as kc, sys
    sys.path.insert(0, {tests!r})
    from kernels import run_vadd
    with kc.connect() as s:
        d = s.device("cpu0")
        assert d.total_memory == {memory}, d.total_memory
        run_vadd(d)
        try:
            d.allocate({memory} + (1 << 20))
            print("allocated above the quota")
        except kc.OutOfMemoryError:
            print("ok")
"""


def test_register_list_allocate_release(broker, setup):
    kubelet, plugin, stub, podres = setup
    plugin.register()
    (r,) = kubelet.registered
    assert (r.version, r.endpoint, r.resource_name, r.options.get_preferred_allocation_available) == (
        "v1beta1", "kubecash.io-share.sock", "kubecash.io/share", True)
    opts = stub.GetDevicePluginOptions(dp.Empty(), timeout=5)
    assert (opts.pre_start_required, opts.get_preferred_allocation_available) == (False, True)
    stream = stub.ListAndWatch(dp.Empty(), timeout=30)
    listed = next(stream).devices
    assert len(listed) == 1000 and {d.health for d in listed} == {"Healthy"}
    stream.cancel()
    ids = [d.ID for d in listed]
    pref = stub.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=ids, must_include_deviceIDs=ids[:1],
                                               allocation_size=250)]), timeout=5)
    assert len(pref.container_responses[0].deviceIDs) == 250 and ids[0] in pref.container_responses[0].deviceIDs
    got = ids[:250]
    resp = stub.Allocate(dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=got)]),
                         timeout=30)
    (c,) = resp.container_responses
    assert not c.devices and list(c.envs) == ["KUBECASH_BROKER"]
    tenant = deviceplugin.tenant_for(got)
    (m,) = c.mounts
    assert m.host_path == os.path.join(broker.runtime_dir, "tenants", tenant) and not m.read_only
    with broker.admin() as a:
        st = a.call("status")
    q = st["tenants"][tenant]["devices"]["cpu0"]
    memory = (st["devices"]["cpu0"]["total_memory"] // 4) >> 20 << 20
    assert (q["limit"], q["memory_limit"]) == (0.25, memory)
    # a client given the response's env reaches the tenant, within its quota
    env = {k: v for k, v in os.environ.items() if k != "KUBECASH_BROKER"}
    env.update(c.envs)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT.format(tests=os.path.join(ROOT, "tests"),
                                                                                 memory=memory))],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    # released allocations: a container holds the units -> kept; none does -> removed
    kubelet.pods = [pr.PodResources(name="p", namespace="default", containers=[pr.ContainerResources(
        name="c", devices=[pr.ContainerDevices(resource_name="kubecash.io/share", device_ids=got)])])]
    assert plugin.service.release_unused(podres, grace=0) == []
    kubelet.pods = []
    assert plugin.service.release_unused(podres, grace=3600) == []        # too new to be released
    assert plugin.service.release_unused(podres, grace=0) == [tenant]
    with broker.admin() as a:
        assert tenant not in a.call("status")["tenants"]
    # units this plugin never listed fail the call, with the reason; the plugin serves on
    with pytest.raises(grpc.RpcError) as e:
        stub.Allocate(dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(
            devices_ids=["gpu9-0001"])]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not one of this node's" in e.value.details()
    assert stub.GetDevicePluginOptions(dp.Empty(), timeout=5).get_preferred_allocation_available


def test_unit_tables():
    devices = {"cpu0": 1000 * MiB, "gpu0": 8000 * MiB}
    whole = deviceplugin.unit_ids("cpu0")
    assert deviceplugin.table_for(whole, devices) == {"devices": ["cpu0"], "device": {"cpu0": {}}}
    mixed = deviceplugin.unit_ids("cpu0")[:1] + deviceplugin.unit_ids("gpu0")[:500]
    assert deviceplugin.table_for(mixed, devices) == {"devices": ["cpu0", "gpu0"], "device": {
        "cpu0": {"limit": 0.001, "memory": 1 * MiB}, "gpu0": {"limit": 0.5, "memory": 4000 * MiB}}}
    assert deviceplugin.tenant_for(mixed) == deviceplugin.tenant_for(list(reversed(mixed)))
    for bad in (["cpu0-1000"], ["cpu1-0001"], ["cpu0-x"]):
        with pytest.raises(ValueError, match="is not one of this node's"):
            deviceplugin.table_for(bad, devices)


def test_the_entry_point_registers_and_stops_on_sigterm(broker):
    d = tempfile.mkdtemp(prefix="kc-dp-", dir="/tmp")
    kubelet = Kubelet(d)
    exe = os.path.join(os.path.dirname(sys.executable), "kubecash-device-plugin")
    p = subprocess.Popen([exe, "--runtime-dir", broker.runtime_dir, "--plugin-dir", d,
                          "--pod-resources-socket", os.path.join(d, "kubelet.sock"), "--release-interval", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: kubelet.registered or p.poll() is not None, 30, "the device plugin to register")
        assert p.poll() is None and kubelet.registered[0].resource_name == "kubecash.io/share"
        time.sleep(0.5)          # a few looks for released allocations, against the kubelet's PodResources
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0, out
        assert not os.path.exists(os.path.join(d, deviceplugin.SOCKET_NAME))
    finally:
        if p.poll() is None:
            p.kill()
        kubelet.server.stop(0)
