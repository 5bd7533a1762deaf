"""CDI specs: the lowest cdiVersion their content needs, by the CDI reference library's rules
(tags.cncf.io/container-device-interface specs-go/version.go, MinimumRequiredVersion), and
valid against the published schema at that version."""
from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT

from kubecash.broker import cdi

SCHEMA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "cdi-schema")


def _spec(**top) -> dict:
    return {"cdiVersion": "", "kind": "example.com/device", "devices": [{"name": "dev", "containerEdits": {}}], **top}


def _device(**edits) -> dict:
    return _spec(devices=[{"name": "dev", "containerEdits": edits}])


@pytest.mark.parametrize("doc, want", [
    (_spec(), "0.3.0"),                                                                  # nothing versioned
    (_spec(containerEdits={"mounts": [{"hostPath": "/a", "containerPath": "/a", "type": "bind"}]}), "0.4.0"),
    (_device(mounts=[{"hostPath": "/a", "containerPath": "/a"}]), "0.3.0"),              # no type: older
    (_spec(containerEdits={"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/y"}]}), "0.5.0"),
    (_spec(devices=[{"name": "0dev", "containerEdits": {}}]), "0.5.0"),                  # a leading digit
    (_spec(annotations={"example.com/k": "v"}), "0.6.0"),
    (_spec(devices=[{"name": "dev", "annotations": {"k": "v"}, "containerEdits": {}}]), "0.6.0"),
    (_spec(kind="example.com/some.class"), "0.6.0"),                                     # a dot in the class
    (_spec(kind="example.com/device", annotations={}), "0.3.0"),                         # empty: not used
    (_spec(containerEdits={"additionalGids": [5]}), "0.7.0"),
    (_device(intelRdt={"closID": "c"}), "0.7.0"),
    (_device(intelRdt={"schemata": ["L3:0=ff"]}), "1.1.0"),
    (_spec(containerEdits={"intelRdt": {"enableMonitoring": True}}), "1.1.0"),
    (_device(netDevices=[{"hostInterfaceName": "eth1", "name": "eth1"}]), "1.1.0"),
    (_spec(annotations={"k": "v"}, containerEdits={"additionalGids": [1], "netDevices": [
        {"hostInterfaceName": "eth1", "name": "eth1"}]}), "1.1.0"),                      # newest wins
])
def test_minimum_version_follows_the_reference_rules(doc, want):
    assert cdi.minimum_version(doc) == want


def schema_validator():
    """The published CDI schema's validator (skips where jsonschema or the schema is missing)."""
    jsonschema = pytest.importorskip("jsonschema")
    if not os.path.isdir(SCHEMA_DIR):
        pytest.skip(f"the CDI schema is not at {SCHEMA_DIR}")
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7
    with open(os.path.join(SCHEMA_DIR, "schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(SCHEMA_DIR, "defs.json")) as f:
        defs = json.load(f)
    registry = Registry().with_resource("defs.json", Resource.from_contents(defs, default_specification=DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_kubecash_specs_are_at_the_lowest_version_and_valid_against_the_schema():
    validator = schema_validator()
    # No annotations (0.6.0, which podman 4.3 refuses): tenants' names decide.
    spec = cdi.spec("/run/kubecash", ["alice", "b.c"])
    assert spec["cdiVersion"] == "0.3.0"
    validator.validate(spec)
    spec = cdi.spec("/run/kubecash", ["alice", "0claim"])
    assert spec["cdiVersion"] == "0.5.0"              # a name that starts with a digit
    validator.validate(spec)
