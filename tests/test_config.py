"""Quota file validation: errors name the file, the tenant and the field."""
import pytest

from kubecash.broker import config as cfg

EXAMPLE = "examples/quota.toml"


def test_example_file_loads():
    c = cfg.load(EXAMPLE)
    assert c.tenants, "the example quota file defines tenants"
    for t in c.tenants.values():
        assert t.quota.weight >= 1


def test_sizes():
    assert cfg.parse_size("512MiB") == 512 << 20
    assert cfg.parse_size("8GiB") == 8 << 30
    assert cfg.parse_size("1.5GB") == 1_500_000_000
    assert cfg.parse_size(4096) == 4096
    with pytest.raises(ValueError):
        cfg.parse_size("lots")


@pytest.mark.parametrize("tenant, field, message", [
    ({"weight": 0}, "weight", "1 to 10000"),
    ({"weight": -5}, "weight", "1 to 10000"),
    ({"weight": 2.5}, "weight", "integer"),
    ({"limit": 0.00001}, "limit", "0.0001"),
    ({"limit": 3.0}, "limit", "number of devices"),
    ({"class": "urgent"}, "class", "batch, latency"),
    ({"memory": "lots"}, "memory", "not a size"),
    ({"colour": "red"}, "colour", "unknown field"),
])
def test_invalid_tenant_fields(tenant, field, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse({"tenants": {"alice": tenant}}, "q.toml", device_count=2)
    text = str(e.value)
    assert text.startswith("q.toml: ") and "tenant 'alice'" in text and f"'{field}'" in text
    assert message in text


def test_per_device_override_and_devices():
    c = cfg.parse({"tenants": {"a": {"memory": "1GiB", "weight": 200, "devices": ["cpu0"],
                                     "device": {"gpu0": {"memory": "2GiB"}}}}})
    t = c.tenants["a"]
    assert t.quota_for("cpu0").memory == 1 << 30
    assert t.quota_for("gpu0").memory == 2 << 30 and t.quota_for("gpu0").weight == 200
    assert t.may_use("cpu0") and not t.may_use("gpu1")


def test_broken_files(tmp_path):
    p = tmp_path / "q.toml"
    p.write_text("[tenants.a\nweight = 1")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(str(p))
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(str(tmp_path / "missing.toml"))
    with pytest.raises(cfg.ConfigError, match="tenant 'bad name!'"):
        cfg.parse({"tenants": {"bad name!": {}}})
    with pytest.raises(cfg.ConfigError, match="heartbeat_timeout_s"):
        cfg.parse({"broker": {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 1}})


def test_the_reference_documents_every_field_once_and_is_a_valid_quota_file():
    """The quota file's fields are documented in one place (their declarations); the
    reference printed from them parses and names every field."""
    import dataclasses
    import subprocess
    import sys
    import tomllib
    out = subprocess.run([sys.executable, "-m", "kubecash.broker.config"], capture_output=True,
                         text=True, check=True).stdout
    assert out == cfg.reference()
    data = tomllib.loads(out)
    parsed = cfg.parse(data, "<reference>")
    assert set(data["broker"]) == {f.name for f in dataclasses.fields(cfg.BrokerSettings)}
    assert parsed.broker == cfg.BrokerSettings(**{**dataclasses.asdict(cfg.BrokerSettings()),
                                                  **data["broker"]})
    alice = data["tenants"]["alice"]
    assert set(alice) - {"device"} == set(cfg.QUOTA_FIELDS) | {"devices", "owner"}
    for cls in (cfg.BrokerSettings, cfg.Quota):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
    assert parsed.broker.limits.max_sessions_per_tenant == 256


@pytest.mark.parametrize("field, value, message", [
    ("quantum_ms", float("inf"), "finite"),                 # R6: passed, then OverflowError at start and reload
    ("quantum_ms", float("nan"), "finite"),
    ("quantum_ms", 1e300, "from 0.1 to 10000"),
    ("heartbeat_interval_s", float("nan"), "finite"),      # R10
    ("heartbeat_timeout_s", float("inf"), "finite"),
    ("max_requests_per_tenant_s", float("nan"), "finite"),
    ("runtime_dir", "", "absolute path"),                   # R10: served from the working directory
    ("runtime_dir", "run/kubecash", "absolute path"),
    ("cache_dir", "cache", "absolute path"),
    ("admin_socket", "admin.sock", "absolute path"),
    ("max_message_bytes", 1 << 40, "from 1024"),
    ("max_module_bytes", 64 << 20, "to 3.35544e+07"),
    ("executor_threads", 1 << 20, "from 0 to 4096"),
    ("cpu_devices", 0, "from 1 to 16"),
])
def test_broker_settings_are_finite_in_range_and_paths_absolute(field, value, message):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse({"broker": {field: value}}, "q.toml")
    assert f"q.toml: [broker] field '{field}'" in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("name", [".", ".."])
def test_tenant_names_dot_and_dotdot_are_refused(name):
    """R7: '.' made tenants/ itself the tenant's directory; '..' handed the runtime directory over."""
    with pytest.raises(cfg.ConfigError, match=r"tenant '\.\.?'.*not \. or \.\."):
        cfg.parse({"tenants": {name: {"owner": "65534"}}}, "q.toml")


@pytest.mark.parametrize("value, message", [
    ("/nonexistent/ns/mnt", "does not exist"),
    ("/etc/passwd", "is not a namespace link"),
    ("/proc/self/ns/net", "not a mount namespace"),
    ("ns/mnt", "must be an absolute path"),
])
def test_mount_namespace_must_be_one(value, message):
    """A path that cannot be a mount namespace is refused at load (and so on reload, which
    keeps the running configuration), naming the field; not a warning per tenant later."""
    with pytest.raises(cfg.ConfigError, match=rf"q.toml: \[broker\] field 'mount_namespace': .*{message}"):
        cfg.parse({"broker": {"mount_namespace": value}}, "q.toml")
    assert cfg.parse({"broker": {"mount_namespace": "/proc/self/ns/mnt"}}).broker.mount_namespace


@pytest.mark.parametrize("owner, message", [
    ("4294967295", "uid 4294967295 is out of range"),    # (uid_t)-1: setresuid would change nothing
    ("1000:4294967295", "gid 4294967295 is out of range"),
    ("-1", "no such user"),
    ("no-such-user-here", "no such user"),
    ("\u0660", "no such user"),                          # an Arabic-Indic zero is not uid 0
    ("0:", "expected"), (":0", "expected"),
    # R10: a number the node has no user (or group) for, unless the operator says so
    ("4294967290", r"uid 4294967290 has no entry on this node \(getent passwd 4294967290 finds none\)"
                   r".*\[broker\] unlisted_owners = true"),
    ("65534:4294967290", r"gid 4294967290 has no entry on this node \(getent group"),
])
def test_owners_are_real_ids(owner, message):
    """R10: an owner must be a user of this node, by name or by number; a number it does not
    list only with [broker] unlisted_owners (containers' uids often are not in /etc/passwd)."""
    with pytest.raises(cfg.ConfigError, match=f"tenant 'a', field 'owner': {message}"):
        cfg.parse({"tenants": {"a": {"owner": owner}}}, "q.toml")
    unlisted = {"broker": {"unlisted_owners": True}}
    assert cfg.parse({**unlisted, "tenants": {"a": {"owner": "4294967294"}}}).tenants["a"].owner[0] == 4294967294
    assert cfg.parse({"tenants": {"a": {"owner": "65534:65534"}}}).tenants["a"].owner == (65534, 65534)


def test_tenants_sharing_an_owner_uid_are_named():
    c = cfg.parse({"broker": {"unlisted_owners": True},
                   "tenants": {"a": {"owner": "1000"}, "b": {"owner": "1000:2000"}, "c": {"owner": "1001"},
                               "d": {"owner": "0"}, "e": {"owner": "0"}, "f": {}}}, "q.toml")
    assert cfg.shared_owners(c) == {1000: ["a", "b"]}


def test_executor_uid_range_is_checked():
    with pytest.raises(cfg.ConfigError, match="executor_uid_max': must not be below executor_uid_min"):
        cfg.parse({"broker": {"executor_uid_min": 70000, "executor_uid_max": 60000}}, "q.toml")
    with pytest.raises(cfg.ConfigError, match="executor_uid_min'.*from 1"):
        cfg.parse({"broker": {"executor_uid_min": 0}}, "q.toml")


def test_kernel_time_bound_is_finite():
    with pytest.raises(cfg.ConfigError, match="tenant 'a', field 'max_kernel_seconds': must be a finite"):
        cfg.parse({"tenants": {"a": {"max_kernel_seconds": float("nan")}}}, "q.toml")
    assert cfg.parse({"broker": {"cache_dir": "", "admin_socket": "/run/x.sock"}}).broker.cache_dir == ""
