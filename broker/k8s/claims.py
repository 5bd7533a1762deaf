"""A prepared claim's tenant: what the scheduler allocated a ResourceClaim on this node,
read as the table of a dynamic tenant (broker/server/dynamic.py).

The claim is the API's JSON (`resource.k8s.io/v1` ResourceClaim, camelCase, as the API server
returns it). Each allocation result of this driver names a device of this node's pool and the
capacity it consumed: `share` (a fraction of the device's time, the tenant's hard `limit`)
and `memory` (bytes, its memory quota). Opaque configuration for the driver (from the class,
then the claim: later entries win) sets `weight` and `class`; `owner` (the uid:gid the pods
run as, which the tenant's directory is given to and its executors run as) only from the
DeviceClass's configuration (source FromClass), which the cluster's administrator writes: a
claim naming a uid could share another tenant's executors' uid. A result with no consumed
capacity is a whole device (a cluster without consumable capacity allocates exclusively):
no limit, all its memory. Everything wrong with a claim is a ClaimError saying what.
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Any

from . import DRIVER, quantity

TENANT_PREFIX = "k8s-"
# a Kubernetes uid is a UUID; anything of these characters that fits a tenant name is accepted
_UID = re.compile(r"^[A-Za-z0-9-]{1,60}$")
CONFIG_API_VERSION = "kubecash.io/v1alpha1"
CONFIG_KIND = "TenantConfig"
_CONFIG_KEYS = {"apiVersion", "kind", "weight", "class", "owner"}


class ClaimError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ClaimRef:
    """The kubelet's Claim: all it tells a plugin about a claim."""
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"


@dataclasses.dataclass(frozen=True)
class Result:
    """One allocation result of this driver, as the kubelet's response names it."""
    request: str
    pool: str
    device: str
    share_id: str | None


def tenant_name(uid: str) -> str:
    """The claim's tenant: derived from its uid, so a restarted plugin finds it again."""
    if not isinstance(uid, str) or not _UID.match(uid):
        raise ClaimError(f"claim uid {uid!r} is not a Kubernetes uid")
    return TENANT_PREFIX + uid.lower()


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _applies(config_requests: list, request: str) -> bool:
    # an entry without requests is for all; "req" covers the subrequests "req/sub" (firstAvailable)
    return not config_requests or any(request == r or request.startswith(f"{r}/") for r in config_requests)


def _parameters(entry: dict, where: str) -> dict[str, Any]:
    p = _get(entry, "opaque", "parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise ClaimError(f"{where}: the parameters must be an object")
    unknown = sorted(set(p) - _CONFIG_KEYS)
    if unknown:
        raise ClaimError(f"{where}: unknown parameter(s) {', '.join(unknown)} (allowed: weight, class, owner)")
    if "owner" in p and entry.get("source") != "FromClass":
        raise ClaimError(f"{where}: owner can be set only by the DeviceClass's configuration (source FromClass)")
    if p.get("apiVersion", CONFIG_API_VERSION) != CONFIG_API_VERSION or p.get("kind", CONFIG_KIND) != CONFIG_KIND:
        raise ClaimError(f"{where}: parameters are apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}; "
                         f"got {p.get('apiVersion')!r}, {p.get('kind')!r}")
    return {k: v for k, v in p.items() if k in ("weight", "class", "owner")}


def _consumed(result: dict, key: str, where: str) -> Fraction | None:
    consumed = result.get("consumedCapacity") or {}
    # the slice names it "share"; its qualified name is "kubecash.io/share"
    text = consumed.get(key, consumed.get(f"{DRIVER}/{key}")) if isinstance(consumed, dict) else None
    if text is None:
        return None
    try:
        return quantity.parse(text)
    except quantity.QuantityError as e:
        raise ClaimError(f"{where}: consumed {key}: {e}") from None


def tenant_table(claim: Any, ref: ClaimRef, pool: str, devices: dict[str, int]) -> tuple[dict, list[Result]]:
    """The dynamic tenant's table for `claim`, and its results. `devices`: this node's device
    names and their memory in bytes (the broker's status); `pool`: this node's pool."""
    if not isinstance(claim, dict):
        raise ClaimError(f"claim {ref}: not an object")
    uid = _get(claim, "metadata", "uid")
    if uid != ref.uid:
        raise ClaimError(f"claim {ref}: the API has uid {uid!r} under that name (the claim was replaced)")
    allocation = _get(claim, "status", "allocation")
    if not isinstance(allocation, dict):
        raise ClaimError(f"claim {ref} is not allocated")
    results = _get(allocation, "devices", "results") or []
    configs = _get(allocation, "devices", "config") or []
    if not isinstance(results, list) or not isinstance(configs, list):
        raise ClaimError(f"claim {ref}: allocation.devices.results and .config must be lists")
    ours = [r for r in results if isinstance(r, dict) and r.get("driver") == DRIVER]
    if not ours:
        raise ClaimError(f"claim {ref}: no device of {DRIVER} is allocated to it")
    share: dict[str, Fraction | None] = {}
    memory: dict[str, int | None] = {}
    params: dict[str, dict] = {}
    out = []
    for i, r in enumerate(ours):
        where = f"claim {ref}, result {i}"
        request, dev = r.get("request"), r.get("device")
        if not isinstance(request, str) or not isinstance(dev, str):
            raise ClaimError(f"{where}: request and device must be strings")
        if r.get("pool") != pool:
            raise ClaimError(f"{where}: pool {r.get('pool')!r} is not this node's ({pool!r})")
        if dev not in devices:
            raise ClaimError(f"{where}: no device {dev!r} on this node (it has {', '.join(sorted(devices))})")
        s, m = _consumed(r, "share", where), _consumed(r, "memory", where)
        if s is not None and not 0 < s <= 1:
            raise ClaimError(f"{where}: a share of {quantity.render(s) if s >= 0 else s} of {dev}: it must be "
                             "above 0, at most 1")
        if m is not None and (m <= 0 or m.denominator != 1):
            raise ClaimError(f"{where}: memory {m} of {dev}: a positive whole number of bytes")
        # two results on one device (two requests) add up; one without capacity is all of it
        if dev in share:
            s = None if share[dev] is None or s is None else share[dev] + s
            m = None if memory[dev] is None or m is None else memory[dev] + m
        if s is not None and s > 1:
            raise ClaimError(f"claim {ref}: its shares of {dev} add up to {float(s):g}, more than the device")
        if m is not None and m > devices[dev]:
            raise ClaimError(f"claim {ref}: memory {int(m)} of {dev}: more than its {devices[dev]} bytes")
        share[dev], memory[dev] = s, None if m is None else int(m)
        for j, c in enumerate(configs):
            if isinstance(c, dict) and _get(c, "opaque", "driver") == DRIVER and _applies(c.get("requests") or [],
                                                                                           request):
                params.setdefault(dev, {}).update(_parameters(c, f"claim {ref}, config {j}"))
        sid = r.get("shareID")
        out.append(Result(request, pool, dev, sid if isinstance(sid, str) and sid else None))
    per_device = {}
    owners = {p.pop("owner") for p in params.values() if "owner" in p}
    if len(owners) > 1:
        raise ClaimError(f"claim {ref}: its devices' classes name different owners ({', '.join(map(str, owners))})")
    for dev in share:
        q: dict[str, Any] = dict(params.get(dev, {}))
        if share[dev] is not None and share[dev] < 1:
            q["limit"] = float(share[dev])
        if memory[dev] is not None:
            q["memory"] = memory[dev]
        per_device[dev] = q
    table: dict[str, Any] = {"devices": sorted(share), "device": per_device}
    if owners:
        table["owner"] = owners.pop()
    return table, out
