"""The DRA driver kubecash.io: the kubelet's side played over real gRPC (stubs from the
published protos) on unix sockets, against a real broker and a real kubecash-dra process;
the ResourceSlice and DeviceClass checked against the official kubernetes client's models."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from fractions import Fraction

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio is not installed: the kubernetes extra (pip install "
                                          "'kubecash[kubernetes]') is needed for the DRA driver's tests")
from conftest import ROOT, wait_for  # noqa: E402
from test_cdi import schema_validator  # noqa: E402

from kubecash.broker.k8s import DRIVER, claims, quantity, slices  # noqa: E402
from kubecash.broker.k8s.proto import dra_v1_pb2 as dra  # noqa: E402
from kubecash.broker.k8s.proto import dra_v1_pb2_grpc as dra_grpc  # noqa: E402
from kubecash.broker.k8s.proto import pluginregistration_v1_pb2 as reg  # noqa: E402
from kubecash.broker.k8s.proto import pluginregistration_v1_pb2_grpc as reg_grpc  # noqa: E402

PROTO_ROOT = os.path.join(os.path.dirname(ROOT), "shared", "k8s-protos")
DRA = os.path.join(os.path.dirname(sys.executable), "kubecash-dra")
NODE = "node-a"
MiB = 1 << 20


# -- the claims a scheduler would have allocated ---------------------------------------------
def claim(name: str, *results: dict, config: list | None = None, uid: str | None = None,
          allocated: bool = True) -> dict:
    c = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
         "metadata": {"name": name, "namespace": "default", "uid": uid or str(uuid.uuid4())},
         "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
         "status": {}}
    if allocated:
        c["status"] = {"allocation": {"devices": {"results": list(results), "config": config or []}}}
    return c


def result(device: str = "cpu0", share: str | None = "250m", memory: str | None = "64Mi",
           request: str = "gpu", pool: str = NODE) -> dict:
    r = {"request": request, "driver": DRIVER, "pool": pool, "device": device, "shareID": str(uuid.uuid4())}
    consumed = {k: v for k, v in (("share", share), ("memory", memory)) if v is not None}
    if consumed:
        r["consumedCapacity"] = consumed
    return r


def allocated(c: dict, klass: dict, *results: dict) -> dict:
    """`c` (a claim as written) with `results` allocated as the scheduler allocates them: the
    class's configuration (source FromClass), then the claim's (FromClaim)."""
    config = ([{**e, "source": "FromClass", "requests": [r["name"] for r in c["spec"]["devices"]["requests"]]}
               for e in klass["spec"].get("config", [])]
              + [{**e, "source": "FromClaim"} for e in c["spec"]["devices"].get("config", [])])
    return {**c, "status": {"allocation": {"devices": {"results": list(results), "config": config}}}}


def opaque(requests: list[str] | None = None, source: str = "FromClaim", **params) -> dict:
    return {"source": source, "requests": requests or [],
            "opaque": {"driver": DRIVER, "parameters": {"apiVersion": claims.CONFIG_API_VERSION,
                                                        "kind": claims.CONFIG_KIND, **params}}}


def assert_model(cls_name: str, obj: dict) -> None:
    """`obj` is a valid object of that kubernetes client model, every field known to it (the
    models forbid extra fields), and nothing of it is lost on the way back."""
    client = pytest.importorskip("kubernetes.client", reason="the kubernetes client (the kubernetes extra) "
                                                            "holds the models")
    model = getattr(client, cls_name).model_validate(obj)
    assert json.loads(model.to_json()) == obj


# -- the kubelet's side -------------------------------------------------------------------------
class Dra:
    """A kubecash-dra process with the kubelet's directories in a private one; `stub()` and
    `registration()` are the kubelet's gRPC clients."""

    def __init__(self, broker, base: str, cdi_dir: str | None = None, container_runtime_dir: str | None = None,
                 publish: list[str] | None = None):
        self.broker, self.base = broker, base
        self.publish = publish or ["--no-publish"]      # or the flags that publish, to where
        self.claims_dir = os.path.join(base, "claims")
        self.cdi_dir = cdi_dir or os.path.join(base, "cdi")
        # by default the host is the container: a client uses the broker's runtime directory as is
        self.container_runtime_dir = container_runtime_dir or broker.runtime_dir
        self.registry = os.path.join(base, "plugins_registry")
        self.plugins = os.path.join(base, "plugins")
        self.state_dir = os.path.join(base, "state")
        self.proc: subprocess.Popen | None = None
        self._channels: list = []

    def start(self) -> None:
        self.log = open(os.path.join(self.base, "dra.log"), "a")
        self.proc = subprocess.Popen(
            [DRA, "--node-name", NODE, "--runtime-dir", self.broker.runtime_dir, "--state-dir", self.state_dir,
             "--cdi-dir", self.cdi_dir, "--container-runtime-dir", self.container_runtime_dir,
             "--registry-dir", self.registry, "--plugins-dir", self.plugins, "--claims-dir", self.claims_dir,
             *self.publish], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._answers(), 30, "kubecash-dra to serve registration")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.logs()
        try:
            self.registration().GetInfo(reg.InfoRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(20) == 0, self.logs()
        self.proc = None

    def logs(self) -> str:
        with open(os.path.join(self.base, "dra.log")) as f:
            return f.read()

    def _channel(self, path: str):
        ch = grpc.insecure_channel(f"unix://{path}")
        self._channels.append(ch)
        return ch

    def registration(self):
        return reg_grpc.RegistrationStub(self._channel(os.path.join(self.registry, f"{DRIVER}-reg.sock")))

    def stub(self, endpoint: str | None = None):
        return dra_grpc.DRAPluginStub(self._channel(endpoint or os.path.join(self.plugins, DRIVER, "dra.sock")))

    def put(self, c: dict) -> dra.Claim:
        d = os.path.join(self.claims_dir, c["metadata"]["namespace"])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, c["metadata"]["name"] + ".json"), "w") as f:
            json.dump(c, f)
        return dra.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"], uid=c["metadata"]["uid"])

    def prepare(self, *cs: dra.Claim):
        return self.stub().NodePrepareResources(dra.NodePrepareResourcesRequest(claims=cs), timeout=30)

    def unprepare(self, *cs: dra.Claim):
        return self.stub().NodeUnprepareResources(dra.NodeUnprepareResourcesRequest(claims=cs), timeout=30)


@pytest.fixture
def plugin(broker):
    base = tempfile.mkdtemp(prefix="kc-dra-", dir="/tmp")     # unix socket paths stay short
    p = Dra(broker, base)
    p.start()
    yield p
    p.stop()


def dynamic(broker) -> dict:
    with broker.admin() as a:
        return {n: t for n, t in a.call("tenant_list")["tenants"].items() if t["source"] == "dynamic"}


def cdi_env(p: Dra, cdi_id: str) -> dict[str, str]:
    kind, _, name = cdi_id.partition("=")
    with open(os.path.join(p.cdi_dir, f"kubecash.io-{name}.json")) as f:
        spec = json.load(f)
    assert spec["kind"] == kind and spec["cdiVersion"] == "0.3.0"     # podman 4.3 refuses 0.6.0
    schema_validator().validate(spec)
    (dev,) = [d for d in spec["devices"] if d["name"] == name]
    return dict(e.split("=", 1) for e in dev["containerEdits"]["env"])


CLIENT = """
    import numpy as np, kubecash.client as kc, sys
    sys.path.insert(0, {tests!r})
    from kernels import run_vadd
    with kc.connect() as s:
        d = s.device("cpu0")
        assert d.total_memory == 64 << 20, d.total_memory
        run_vadd(d)
        try:
            d.allocate(65 << 20)
            print("allocated above the quota")
        except kc.OutOfMemoryError:
            print("ok")
"""


def test_generated_stubs_are_the_published_protos_regenerated(tmp_path):
    """The checked-in stubs are what broker/k8s/gen.py makes from ../shared/k8s-protos now."""
    if not os.path.isdir(PROTO_ROOT):
        pytest.skip(f"no copy of the kubelet's protos at {PROTO_ROOT}")
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    from kubecash.broker.k8s import gen
    written = gen.generate(PROTO_ROOT, str(tmp_path))
    assert len(written) == 2 * len(gen.PROTOS)
    for f in written:
        assert filecmp.cmp(tmp_path / f, os.path.join(gen.HERE, f), shallow=False), \
            f"{f} differs from a fresh run: run python -m kubecash.broker.k8s.gen"


def test_registration_names_the_v1_dra_service(plugin):
    info = plugin.registration().GetInfo(reg.InfoRequest(), timeout=5)
    assert (info.type, info.name, list(info.supported_versions)) == ("DRAPlugin", DRIVER, ["v1.DRAPlugin"])
    assert info.endpoint == os.path.join(plugin.plugins, DRIVER, "dra.sock") and os.path.exists(info.endpoint)
    plugin.registration().NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True), timeout=5)
    plugin.registration().NotifyRegistrationStatus(
        reg.RegistrationStatus(plugin_registered=False, error="version mismatch"), timeout=5)
    assert "the kubelet refused the registration: version mismatch" in plugin.logs()
    # the kubelet dials the endpoint it was given, by the service name of the v1 proto
    assert plugin.stub(info.endpoint).NodePrepareResources(dra.NodePrepareResourcesRequest(), timeout=5).claims == {}


def test_prepare_run_unprepare_and_restart(broker, plugin):
    c = claim("pod-a-gpu", result(share="250m", memory="64Mi", request="gpu/quarter"),   # firstAvailable's
              config=[opaque(source="FromClass", weight=50), opaque(["gpu"], weight=300, **{"class": "latency"})])
    assert_model("ResourceV1ResourceClaim", c)
    ref = plugin.put(c)
    tenant = "k8s-" + ref.uid
    resp = plugin.prepare(ref).claims[ref.uid]
    assert resp.error == ""
    (d,) = resp.devices
    assert (list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids), d.share_id) == (
        ["gpu"], NODE, "cpu0", [f"kubecash.io/tenant={tenant}"], c["status"]["allocation"]["devices"]["results"][0]
        ["shareID"])
    # the tenant has exactly the claimed capacity, weight and class from the claim's config
    with broker.admin() as a:
        q = a.call("status")["tenants"][tenant]["devices"]
    assert set(q) == {"cpu0"}
    assert (q["cpu0"]["limit"], q["cpu0"]["memory_limit"], q["cpu0"]["weight"], q["cpu0"]["class"]) == (
        0.25, 64 * MiB, 300, "latency")
    # a client given only the CDI device's edits reaches it, within its memory quota
    env = dict(os.environ, PYTHONUNBUFFERED="1", **cdi_env(plugin, d.cdi_device_ids[0]))
    env.pop("KUBECASH_BROKER", None)
    env.update(cdi_env(plugin, d.cdi_device_ids[0]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT.format(tests=os.path.join(ROOT, "tests")))],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    # the same claim again: the same answer, nothing changed
    again = plugin.prepare(ref).claims[ref.uid]
    assert again == resp and set(dynamic(broker)) == {tenant}
    # a restart: prepared claims come back from the record (the CDI spec, removed while the
    # plugin was down, is written again), and unprepare after it works
    plugin.stop()
    os.unlink(os.path.join(plugin.cdi_dir, f"kubecash.io-{tenant}.json"))
    plugin.start()
    assert os.path.exists(os.path.join(plugin.cdi_dir, f"kubecash.io-{tenant}.json"))
    assert plugin.unprepare(ref).claims[ref.uid].error == ""
    assert dynamic(broker) == {} and os.listdir(plugin.cdi_dir) == []
    with open(os.path.join(plugin.state_dir, "dra-claims.json")) as f:
        assert json.load(f)["claims"] == {}
    # unpreparing what is gone is done, as the kubelet expects of a repeated call
    assert plugin.unprepare(ref).claims[ref.uid].error == ""


def test_restart_brings_back_a_tenant_the_broker_lost(broker, plugin):
    ref = plugin.put(claim("pod-b", result(share="100u", memory="8Mi")))
    assert plugin.prepare(ref).claims[ref.uid].error == ""
    tenant = "k8s-" + ref.uid
    plugin.stop()
    with broker.admin() as a:        # as when the broker's state file was set aside
        a.call("tenant_remove", tenant=tenant)
    plugin.start()
    assert set(dynamic(broker)) == {tenant}
    with broker.admin() as a:
        q = a.call("status")["tenants"][tenant]["devices"]["cpu0"]
    assert (q["limit"], q["memory_limit"]) == (0.0001, 8 * MiB)
    assert plugin.unprepare(ref).claims[ref.uid].error == ""


def test_bad_claims_get_their_own_error_and_the_plugin_serves_on(broker, plugin):
    good = plugin.put(claim("good", result(share="500m", memory="16Mi"),
                            config=[opaque(source="FromClass", owner="0:0")]))
    bad = {
        "not allocated": (plugin.put(claim("unallocated", allocated=False)), "is not allocated"),
        "unknown device": (plugin.put(claim("nodev", result(device="gpu7"))), "no device 'gpu7' on this node"),
        "share 0": (plugin.put(claim("zero", result(share="0"))), "a share of 0 of cpu0: it must be above 0"),
        "other pool": (plugin.put(claim("pool", result(pool="node-b"))), "pool 'node-b' is not this node's"),
        "too much memory": (plugin.put(claim("big", result(memory="1Ei"))), "more than its"),
        "not ours": (plugin.put(claim("other", {**result(), "driver": "gpu.example.com"})),
                     "no device of kubecash.io is allocated"),
        "bad parameter": (plugin.put(claim("param", result(), config=[opaque(colour="red")])),
                          "unknown parameter(s) colour"),
        "claim's owner": (plugin.put(claim("owner", result(), config=[opaque(owner="0:0")])),
                          "owner can be set only by the DeviceClass"),
        "bad weight": (plugin.put(claim("weight", result(), config=[opaque(weight=0)])),
                       "must be an integer from 1 to 10000"),
        "replaced": (plugin.put(claim("replaced", result(), uid=str(uuid.uuid4()))), "the claim was replaced"),
        "no file": (dra.Claim(namespace="default", name="missing", uid=str(uuid.uuid4())), "not found"),
        "bad uid": (dra.Claim(namespace="default", name="good", uid="../x"), "is not a Kubernetes uid"),
    }
    replaced = bad["replaced"][0]
    bad["replaced"] = (dra.Claim(namespace=replaced.namespace, name=replaced.name, uid=str(uuid.uuid4())),
                       "the claim was replaced")
    resp = plugin.prepare(good, *(ref for ref, _ in bad.values())).claims
    assert resp[good.uid].error == "" and len(resp[good.uid].devices) == 1
    for what, (ref, expected) in bad.items():
        assert expected in resp[ref.uid].error, (what, resp[ref.uid].error)
        assert not resp[ref.uid].devices
    assert set(dynamic(broker)) == {"k8s-" + good.uid}      # no half-made tenant of a bad claim
    assert dynamic(broker)["k8s-" + good.uid]["table"]["owner"] == "0:0"
    assert plugin.proc.poll() is None
    un = plugin.unprepare(good, bad["bad uid"][0]).claims
    assert un[good.uid].error == "" and "is not a Kubernetes uid" in un["../x"].error
    assert dynamic(broker) == {}
    plugin.registration().GetInfo(reg.InfoRequest(), timeout=5)     # still serving


def test_claim_tables():
    ref = claims.ClaimRef("default", "c", str(uuid.uuid4()))
    c = claim("c", result(share="250m", memory="64Mi", request="a/big"), result(share="100m", memory="1Gi",
              request="b", device="cpu1"), result(share="250m", memory="64Mi", request="c"),
              result(share=None, memory=None, request="d", device="cpu2"),
              config=[opaque(weight=10), opaque(["a"], weight=20), opaque(["b"], **{"class": "latency"}),
                      {"source": "FromClaim", "requests": [], "opaque": {"driver": "o.io", "parameters": {"x": 1}}}],
              uid=ref.uid)
    assert_model("ResourceV1ResourceClaim", c)
    table, results = claims.tenant_table(c, ref, NODE, {"cpu0": 8 << 30, "cpu1": 8 << 30, "cpu2": 8 << 30})
    assert table == {"devices": ["cpu0", "cpu1", "cpu2"], "device": {
        # two requests on one device add up; their configs merge, the later request's last
        "cpu0": {"weight": 10, "limit": 0.5, "memory": 128 * MiB},
        "cpu1": {"weight": 10, "class": "latency", "limit": 0.1, "memory": 1 << 30},
        "cpu2": {"weight": 10}}}     # no consumed capacity: the whole device
    assert [r.request for r in results] == ["a/big", "b", "c", "d"]
    qualified = claim("q", {**result(), "consumedCapacity": {"kubecash.io/share": "1m", "kubecash.io/memory": "1Mi"}},
                      uid=ref.uid)
    assert claims.tenant_table(qualified, ref, NODE, {"cpu0": 8 << 30})[0]["device"]["cpu0"] == {
        "limit": 0.001, "memory": MiB}
    owned = claim("w", result(), config=[opaque(source="FromClass", owner="1000:1000")], uid=ref.uid)
    assert claims.tenant_table(owned, ref, NODE, {"cpu0": 8 << 30})[0]["owner"] == "1000:1000"
    with pytest.raises(claims.ClaimError, match="owner can be set only by the DeviceClass"):
        claims.tenant_table(claim("w", result(), config=[opaque(owner="0")], uid=ref.uid), ref, NODE, {"cpu0": 1 << 30})
    over = claim("o", result(share="750m"), result(share="500m", request="x"), uid=ref.uid)
    with pytest.raises(claims.ClaimError, match="add up to 1.25"):
        claims.tenant_table(over, ref, NODE, {"cpu0": 8 << 30})


@pytest.mark.parametrize("text,value,canonical", [
    ("250m", "1/4", "250m"), ("0.25", "1/4", "250m"), ("100u", "1/10000", "100u"), ("1", 1, "1"),
    ("6Gi", 6 << 30, "6Gi"), ("1.5Gi", 3 << 29, "1536Mi"), ("1e3", 1000, "1000"), ("64M", 64 * 10**6, "62500Ki")])
def test_quantities(text, value, canonical):
    assert quantity.parse(text) == Fraction(value) and quantity.render(quantity.parse(text)) == canonical


@pytest.mark.parametrize("text", ["", "1.2.3", "1Qi", "ten", "1e99", None, True])
def test_bad_quantities(text):
    with pytest.raises(quantity.QuantityError):
        quantity.parse(text)


def test_resource_slice_and_device_class_are_valid_api_objects(broker):
    with broker.admin() as a:
        devices = a.call("status")["devices"]
    s = slices.resource_slice(NODE, devices)
    assert_model("V1ResourceSlice", s)
    assert_model("V1DeviceClass", slices.device_class())
    (d,) = s["spec"]["devices"]
    assert d["name"] == "cpu0" and d["allowMultipleAllocations"] is True
    assert d["capacity"]["share"] == {"value": "1", "requestPolicy": {
        "default": "1", "validRange": {"min": "100u", "max": "1", "step": "100u"}}}
    mem = quantity.parse(d["capacity"]["memory"]["value"])
    assert mem % MiB == 0 and devices["cpu0"]["total_memory"] - MiB < mem <= devices["cpu0"]["total_memory"]
    assert d["capacity"]["memory"]["requestPolicy"]["validRange"]["step"] == "1Mi"
    # the check itself: a field the API does not have is refused
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        assert_model("V1ResourceSlice", {**s, "spec": {**s["spec"], "sharing": True}})
    # a device no slice can name is left out, not published wrong
    odd = slices.resource_slice(NODE, {"GPU_0": {**devices["cpu0"], "name": "GPU_0"}})
    assert odd["spec"]["devices"] == []


def test_the_readme_claim_is_a_valid_claim():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("```yaml\napiVersion: resource.k8s.io/v1\nkind: ResourceClaim\n", 1)[1].split("```", 1)[0]
    c = yaml.safe_load("apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\n" + block)
    assert_model("ResourceV1ResourceClaim", c)
    assert c["spec"]["devices"]["requests"][0]["exactly"]["capacity"]["requests"] == {"share": "250m", "memory": "6Gi"}


class FakeApiServer:
    """Just enough of the API server's HTTP for ResourceSlices and ResourceClaims: what the
    official client sends is recorded as it arrives."""

    def __init__(self, claims_by_path: dict[str, dict]):
        import http.server
        import threading
        self.requests: list[tuple[str, str, dict | None]] = []
        self.slices: dict[str, dict] = {}
        self.failing = 0          # answer this many requests 503, as a server not up yet
        self.version = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _unavailable(self) -> bool:
                if api.failing <= 0:
                    return False
                api.failing -= 1
                self._reply(503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                                  "reason": "ServiceUnavailable"})
                return True

            def do_GET(self):
                path = self.path.split("?")[0]
                api.requests.append(("GET", self.path, None))
                if self._unavailable():
                    pass
                elif path == "/apis/resource.k8s.io/v1/resourceslices":
                    self._reply(200, {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                                      "metadata": {}, "items": list(api.slices.values())})
                elif path in claims_by_path:
                    self._reply(200, claims_by_path[path])
                else:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                      "reason": "NotFound"})

            def do_POST(self):
                body = self._body()
                api.requests.append(("POST", self.path, body))
                self._reply(201, api.store(body))

            def do_PUT(self):
                body = self._body()
                api.requests.append(("PUT", self.path, body))
                self._reply(200, api.store(body))

            def do_DELETE(self):
                name = self.path.split("?")[0].rsplit("/", 1)[1]
                api.requests.append(("DELETE", self.path, None))
                gone = api.slices.pop(name, None)
                self._reply(200 if gone else 404, gone or {"kind": "Status", "apiVersion": "v1",
                                                           "status": "Failure", "code": 404})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def store(self, body: dict) -> dict:
        """Kept as a server keeps it: at a new resourceVersion."""
        self.version += 1
        stored = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        self.slices[body["metadata"]["name"]] = stored
        return stored

    def writes(self) -> list[tuple[str, str, dict | None]]:
        return [r for r in self.requests if r[0] != "GET"]

    def kubeconfig(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                       "clusters": [{"name": "fake", "cluster": {
                           "server": f"http://127.0.0.1:{self.server.server_port}"}}],
                       "users": [{"name": "fake", "user": {}}],
                       "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}, f)
        return path

    def client(self):
        from kubernetes import client
        return client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}"))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_api_server_gets_the_objects_built_and_gives_claims(broker):
    pytest.importorskip("kubernetes", reason="the kubernetes client (the kubernetes extra) publishes")
    from kubecash.broker.k8s import sources
    with broker.admin() as a:
        devices = a.call("status")["devices"]
    c = claim("api-claim", result())
    api = FakeApiServer({"/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/api-claim": c})
    try:
        s = slices.resource_slice(NODE, devices)
        pub = slices.ApiPublisher(NODE, api.client())
        pub.publish([s])
        (get, post) = api.requests
        assert api.slices[f"{NODE}-{DRIVER}"]["metadata"]["resourceVersion"] == "1"
        assert get[0] == "GET" and "fieldSelector=spec.nodeName%3Dnode-a%2Cspec.driver%3Dkubecash.io" in get[1]
        assert post[:2] == ("POST", "/apis/resource.k8s.io/v1/resourceslices") and post[2] == s
        assert pub.publish([s]) == 0 and api.requests[-1][0] == "GET"    # the server has it as written
        api.store(api.slices[f"{NODE}-{DRIVER}"])                          # someone else changed it
        assert pub.publish([s]) == 1          # replaced, at the version the server has
        put = api.requests[-1]
        assert put[:2] == ("PUT", f"/apis/resource.k8s.io/v1/resourceslices/{NODE}-{DRIVER}")
        assert put[2] == {**s, "metadata": {**s["metadata"], "resourceVersion": "2"}}
        ref = claims.ClaimRef("default", "api-claim", c["metadata"]["uid"])
        assert sources.ApiClaims(api.client()).get(ref) == c
        with pytest.raises(claims.ClaimError, match="answered 404"):
            sources.ApiClaims(api.client()).get(claims.ClaimRef("default", "gone", "x"))
    finally:
        api.close()


def test_the_slice_is_kept_published_through_a_server_down_at_start_and_a_deletion(broker):
    """kubecash-dra publishing for real (--kubeconfig, the official client): an API server that
    refuses its first requests gets the slice once it answers; a slice deleted by someone is
    written again; one the server has as written is not written again."""
    pytest.importorskip("kubernetes", reason="the kubernetes client (the kubernetes extra) publishes")
    api = FakeApiServer({})
    api.failing = 3
    base = tempfile.mkdtemp(prefix="kc-dra-", dir="/tmp")
    p = Dra(broker, base, publish=["--kubeconfig", api.kubeconfig(os.path.join(base, "kubeconfig")),
                                   "--publish-interval", "0.3"])
    name = f"{NODE}-{DRIVER}"
    try:
        p.start()
        wait_for(lambda: name in api.slices, 30, "the slice, once the server answers")
        with broker.admin() as a:
            assert api.slices[name]["spec"] == slices.resource_slice(NODE, a.call("status")["devices"])["spec"]
        assert "was not published (again in" in p.logs()
        n = len(api.writes())
        api.slices.pop(name)                   # kubectl delete resourceslice, say
        wait_for(lambda: name in api.slices, 30, "the deleted slice written again")
        assert [w[0] for w in api.writes()[n:]] == ["POST"]
        gets = sum(r[0] == "GET" for r in api.requests)
        wait_for(lambda: sum(r[0] == "GET" for r in api.requests) >= gets + 3, 30, "three more checks")
        assert [w[0] for w in api.writes()[n:]] == ["POST"]        # nothing changed: nothing written
    finally:
        p.stop()
        api.close()


def test_a_corrupt_record_is_set_aside_and_unprepare_still_finds_the_tenant(broker, plugin):
    ref = plugin.put(claim("pod-c", result(share="500m", memory="8Mi")))
    assert plugin.prepare(ref).claims[ref.uid].error == ""
    plugin.stop()
    record = os.path.join(plugin.state_dir, "dra-claims.json")
    with open(record, "w") as f:
        f.write("{not json")
    plugin.start()
    assert "serving with none" in plugin.logs() and "has no record of its claim" in plugin.logs()
    assert [n for n in os.listdir(plugin.state_dir) if n.startswith("dra-claims.json.bad-")]
    assert plugin.unprepare(ref).claims[ref.uid].error == ""      # the tenant is named from the uid
    assert dynamic(broker) == {} and os.listdir(plugin.cdi_dir) == []


def test_no_broker_is_each_claims_error(tmp_path):
    from kubecash.broker.ctl import AdminClient
    from kubecash.broker.k8s.driver import Driver
    from kubecash.broker.k8s.records import Records
    from kubecash.broker.k8s.sources import FileClaims
    d = Driver(FileClaims(str(tmp_path)), Records(str(tmp_path / "state")), pool=NODE, cdi_dir=str(tmp_path / "cdi"),
               admin=lambda: AdminClient(socket=str(tmp_path / "none.sock"), timeout=0.3))
    refs = [claims.ClaimRef("default", n, str(uuid.uuid4())) for n in ("a", "b")]
    assert all("no broker answering" in o.error for o in d.prepare(refs).values())
    assert all("no broker answering" in e for e in d.unprepare(refs).values())
    assert d.records.claims == {}
