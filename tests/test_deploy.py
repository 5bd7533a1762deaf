"""deploy/kubernetes, the kustomize base (and its overlays): it renders offline, every object
is a valid object of the official kubernetes client's models, and what the manifests say
matches the code: the entry points accept the DaemonSet's command lines, the ConfigMap's
quota file loads, the DeviceClass is the one the driver builds, RBAC grants what the driver
calls. A cluster is not needed (none is reachable here): what one would add is the API
server's own validation and admission (tests/test_dra.py plays the kubelet)."""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of the kubernetes client) reads the manifests")
k8s = pytest.importorskip("kubernetes.client", reason="the kubernetes client (the kubernetes extra) holds the models")

from kubecash.broker import config, ctl, daemon  # noqa: E402
from kubecash.broker.k8s import main as k8s_main  # noqa: E402
from kubecash.broker.k8s import slices  # noqa: E402

DEPLOY = os.path.join(ROOT, "deploy")
BASE = os.path.join(DEPLOY, "kubernetes")
OVERLAYS = sorted(glob.glob(os.path.join(DEPLOY, "overlays", "*")))
KUBECTL = shutil.which("kubectl")
IMAGE = "ghcr.io/kubecash/kubecash"


def render(path: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: kustomize renders the manifests")
    r = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(BASE)


def example() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(BASE, "example", "*.yaml"))):
        with open(path) as f:
            out += [d for d in yaml.safe_load_all(f) if d]
    return out


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def model_class(obj: dict):
    """The client's model for an object: ResourceV1ResourceClaim where the client qualifies
    the name with its group, else V1DaemonSet and the like."""
    group, _, version = obj["apiVersion"].rpartition("/")
    version = version[:1].upper() + version[1:]
    names = [f"{group.split('.')[0].capitalize()}{version}{obj['kind']}"] if group else []
    for name in [*names, f"{version}{obj['kind']}"]:
        if hasattr(k8s, name):
            return getattr(k8s, name)
    raise AssertionError(f"the kubernetes client has no model for {obj['apiVersion']} {obj['kind']}")


def assert_model(obj: dict) -> None:
    """Valid, every field known (the models forbid extra fields), nothing lost on the way back."""
    model = model_class(obj).model_validate(obj)
    assert json.loads(model.to_json()) == obj


# -- rendering and the models -----------------------------------------------------------------
def test_the_base_renders_what_a_node_needs(base):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
    assert kinds == sorted([
        ("Namespace", "kubecash-system"), ("ServiceAccount", "kubecash"), ("ClusterRole", "kubecash-dra"),
        ("ClusterRoleBinding", "kubecash-dra"), ("ConfigMap", "kubecash-broker"), ("DaemonSet", "kubecash"),
        ("DeviceClass", "kubecash.io"), ("ValidatingAdmissionPolicy", "kubecash-resourceslices"),
        ("ValidatingAdmissionPolicyBinding", "kubecash-resourceslices")])


@pytest.mark.parametrize("where", ["base", *(os.path.basename(o) for o in OVERLAYS), "example"])
def test_every_object_is_a_valid_kubernetes_object(base, where):
    objs = (base if where == "base" else example() if where == "example"
            else render(os.path.join(DEPLOY, "overlays", where)))
    assert objs
    for obj in objs:
        assert_model(obj)


# -- the DaemonSet's commands against the entry points ------------------------------------------
class Parsed(Exception):
    pass


def parse(entry, argv: list[str], monkeypatch) -> argparse.Namespace:
    """What `entry` (an entry point's main) makes of argv: its own parser, stopped after parsing."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(Parsed) as e:
            entry(argv)
    return e.value.args[0]


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "DaemonSet", "kubecash")["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def expand(c: dict, argv: list[str]) -> list[str]:
    """The kubelet's $(VAR) expansion, for the variables the downward API sets."""
    env = {e["name"]: "node-a" for e in c.get("env", [])
           if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName"}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]


def host_paths(spec: dict, c: dict) -> dict[str, str]:
    """mountPath -> host path, for the container's hostPath mounts."""
    vols = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: vols[m["name"]]["hostPath"]["path"] for m in c["volumeMounts"]
            if "hostPath" in vols[m["name"]]}


def assert_on_host(spec: dict, c: dict, *paths: str) -> None:
    """Each path is in a hostPath mounted at its own host path: the broker's runtime dir is
    named in CDI specs, the kubelet's directories in registrations, as the host sees them."""
    mounts = host_paths(spec, c)
    for p in paths:
        under = [m for m in mounts if p == m or p.startswith(m.rstrip("/") + "/")]
        assert under, f"{c['name']}: {p} is not on a hostPath mount"
        assert all(mounts[m] == m for m in under), f"{c['name']}: {p} is mounted from elsewhere on the host"


def test_the_broker_runs_with_the_configmaps_quota_file(base, monkeypatch, tmp_path):
    spec = pod_spec(base)
    broker = container(spec, "broker")
    assert broker["restartPolicy"] == "Always", "a sidecar: up before kubecash-dra, which publishes once"
    a = parse(daemon.main, broker["command"][1:], monkeypatch)
    mount = next(m for m in broker["volumeMounts"] if m["name"] == "config")
    cm_name = next(v for v in spec["volumes"] if v["name"] == "config")["configMap"]["name"]
    data = one(base, "ConfigMap", cm_name)["data"]
    assert os.path.dirname(a.config) == mount["mountPath"] and os.path.basename(a.config) in data
    path = tmp_path / "quota.toml"
    path.write_text(data[os.path.basename(a.config)])
    cfg = config.load(str(path))
    assert cfg.tenants == {}, "no static tenants: claims make them"
    b = cfg.broker
    assert_on_host(spec, broker, b.runtime_dir, b.state_dir, b.resolved_admin_socket, b.resolved_cache_dir)
    runtime = next(m for m in broker["volumeMounts"] if m["mountPath"] == b.runtime_dir)
    # tenant file systems are mounted in the host's namespace and must show here
    assert b.mount_namespace == "/proc/1/ns/mnt" and spec["hostPID"] is True
    assert runtime["mountPropagation"] == "HostToContainer"
    assert b.unlisted_owners, "pods' uids are not in the image's /etc/passwd"
    port = int(b.metrics_address.rpartition(":")[2])
    assert {"name": "metrics", "containerPort": port} in broker["ports"]
    for probe in ("startupProbe", "livenessProbe"):
        argv = broker[probe]["exec"]["command"]
        assert argv[0] == "brokerctl"
        p = parse(ctl.main, argv[1:], monkeypatch)
        assert p.runtime_dir == b.runtime_dir and p.cmd == "status"


def test_the_plugins_command_lines_are_what_they_accept(base, monkeypatch):
    spec = pod_spec(base)
    dra = container(spec, "dra")
    a = parse(k8s_main.main, expand(dra, dra["command"])[1:], monkeypatch)
    assert a.node_name == "node-a" and a.claims_dir is None and not a.no_publish
    assert a.runtime_dir == a.container_runtime_dir == "/run/kubecash"
    assert_on_host(spec, dra, a.runtime_dir, a.state_dir, a.cdi_dir, a.registry_dir,
                   os.path.join(a.plugins_dir, "kubecash.io"))
    # in-cluster credentials for kubecash-dra alone
    assert spec["automountServiceAccountToken"] is False
    assert any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in dra["volumeMounts"])
    assert not any("serviceaccount" in m["mountPath"] for m in container(spec, "broker")["volumeMounts"])
    dp_spec = pod_spec(render(os.path.join(DEPLOY, "overlays", "device-plugin")))
    assert [c["name"] for c in dp_spec["containers"]] == ["device-plugin"]
    dp = container(dp_spec, "device-plugin")
    d = parse(k8s_main.device_plugin_main, dp["command"][1:], monkeypatch)
    assert_on_host(dp_spec, dp, d.runtime_dir, d.plugin_dir, d.pod_resources_socket)


def test_privileges_are_the_brokers_alone(base):
    spec = pod_spec(base)
    broker = container(spec, "broker")["securityContext"]
    assert not broker.get("privileged") and broker["capabilities"]["drop"] == ["ALL"]
    assert sorted(broker["capabilities"]["add"]) == sorted([
        "SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE", "SETUID", "SETGID", "CHOWN", "FOWNER", "DAC_OVERRIDE",
        "KILL", "SYS_RESOURCE"])
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged")
        assert all(m.get("mountPropagation") in (None, "None") for m in c["volumeMounts"])


def test_images_are_the_packages_version(base):
    version = importlib.metadata.version("kubecash")
    for where, tag in (("base", version), ("gpu", f"{version}-gpu"), ("device-plugin", version)):
        objs = base if where == "base" else render(os.path.join(DEPLOY, "overlays", where))
        spec = pod_spec(objs)
        images = {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
        assert images == {f"{IMAGE}:{tag}"}, where
    with open(os.path.join(DEPLOY, "Containerfile")) as f:
        text = f.read()
    assert "ARG EXTRAS=broker,kubernetes" in text and f"{IMAGE}:{version}" in text


def test_gpu_nodes_get_their_devices_from_the_toolkit_not_host_paths():
    spec = pod_spec(render(os.path.join(DEPLOY, "overlays", "gpu")))
    assert spec["runtimeClassName"] == "nvidia"
    env = {e["name"]: e["value"] for e in container(spec, "broker")["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert not any(e["name"].startswith("NVIDIA_") for e in container(spec, "dra")["env"])
    assert not any(v.get("hostPath", {}).get("path", "").startswith("/dev") for v in spec["volumes"])


# -- what the code builds and calls -------------------------------------------------------------
def test_the_device_class_is_the_drivers(base):
    assert one(base, "DeviceClass") == slices.device_class()


def test_rbac_grants_what_the_driver_calls(base):
    verbs = {"read_namespaced_resource_claim": ("resourceclaims", "get"),
             "list_resource_slice": ("resourceslices", "list"),
             "create_resource_slice": ("resourceslices", "create"),
             "replace_resource_slice": ("resourceslices", "update"),
             "delete_resource_slice": ("resourceslices", "delete")}
    called = set()
    for path in glob.glob(os.path.join(ROOT, "broker", "k8s", "*.py")):
        with open(path) as f:
            called |= set(re.findall(r"\bself\.api\.(\w+)\(", f.read()))
    assert called and called <= set(verbs), f"a call this test does not know: {called - set(verbs)}"
    role = one(base, "ClusterRole", "kubecash-dra")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert all(rule["apiGroups"] == ["resource.k8s.io"] for rule in role["rules"])
    assert granted == {verbs[c] for c in called}
    binding = one(base, "ClusterRoleBinding", "kubecash-dra")
    sa = pod_spec(base)["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "kubecash-system"}]
    policy = one(base, "ValidatingAdmissionPolicy")
    assert f"system:serviceaccount:kubecash-system:{sa}" in policy["spec"]["matchConditions"][0]["expression"]


def test_the_example_claim_is_the_readmes_and_the_pod_uses_it():
    objs = example()
    claim, pod = one(objs, "ResourceClaim"), one(objs, "Pod")
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
    readme = [d for b in blocks for d in yaml.safe_load_all(b) if d and d.get("kind") == "ResourceClaim"]
    assert len(readme) == 1
    assert {**claim, "metadata": {"name": claim["metadata"]["name"]}} == readme[0]
    request = claim["spec"]["devices"]["requests"][0]
    # its class: the driver's devices, tenants owned by the uid:gid the pod runs as
    klass = one(objs, "DeviceClass")
    assert request["exactly"]["deviceClassName"] == klass["metadata"]["name"]
    sc = pod["spec"]["containers"][0]["securityContext"]
    owner = f"{sc['runAsUser']}:{sc['runAsGroup']}"
    assert sc["runAsNonRoot"] and sc["capabilities"] == {"drop": ["ALL"]} and not sc["allowPrivilegeEscalation"]
    assert klass == slices.device_class(owner)
    assert request["exactly"]["capacity"]["requests"] == {"share": "250m", "memory": "6Gi"}
    (ref,) = pod["spec"]["resourceClaims"]
    assert ref["resourceClaimName"] == claim["metadata"]["name"]
    assert pod["spec"]["containers"][0]["resources"]["claims"] == [{"name": ref["name"]}]
