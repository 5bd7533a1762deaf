"""The DRA driver's node side, apart from gRPC: a prepared claim is a dynamic tenant of the
broker (made through its admin socket, `tenant_add`) and a CDI spec for it; unpreparing
removes both. Idempotent per claim uid, serialised (one claim operation at a time: the
kubelet calls in batches, the broker's admin socket answers one request at a time anyway).

Every claim gets its own outcome: what went wrong with one (an unallocated claim, an unknown
device, a broker refusal) is its error string, the kubelet's convention; nothing raised
escapes to the gRPC server.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubecash.client.errors import KubecashError

from .. import cdi, state
from ..ctl import AdminClient
from .claims import TENANT_PREFIX, ClaimError, ClaimRef, Result, tenant_name, tenant_table
from .records import Records
from .sources import ClaimSource

log = logging.getLogger("kubecash.dra")


@dataclasses.dataclass
class Outcome:
    results: list[Result] = dataclasses.field(default_factory=list)
    cdi_ids: list[str] = dataclasses.field(default_factory=list)
    error: str = ""


class Driver:
    def __init__(self, claims: ClaimSource, records: Records, *, pool: str, cdi_dir: str,
                 admin: Callable[[], AdminClient], container_runtime_dir: str = "/run/kubecash"):
        self.claims, self.records, self.pool = claims, records, pool
        self.cdi_dir, self.admin = cdi_dir, admin
        self.container_runtime_dir = container_runtime_dir
        self._lock = threading.Lock()

    def cdi_path(self, tenant: str) -> str:
        return os.path.join(self.cdi_dir, f"kubecash.io-{tenant}.json")

    def _write_cdi(self, runtime_dir: str, tenant: str) -> str:
        doc = cdi.spec(runtime_dir, [tenant], container_runtime_dir=self.container_runtime_dir)
        state.write_atomic(self.cdi_path(tenant), (json.dumps(doc, indent=2) + "\n").encode())
        return f"{cdi.KIND}={tenant}"

    def _each(self, what: str, refs: Iterable[ClaimRef], ask: str,
              one: Callable[[AdminClient, dict, ClaimRef], Any]) -> dict[str, tuple[Any, str]]:
        """`one(admin, reply to ask, ref)` for each claim: per uid (its value, "") or (None,
        its error). `ask` goes to the broker once a batch, when the first claim needs it."""
        refs = list(refs)
        out: dict[str, tuple[Any, str]] = {}
        with self._lock:
            try:
                with self.admin() as admin:
                    answer = None
                    for ref in refs:
                        try:
                            if answer is None:
                                answer = admin.call(ask)
                            out[ref.uid] = (one(admin, answer, ref), "")
                        except Exception as e:     # the claim's error, never the plugin's
                            out[ref.uid] = (None, _reason(e, ref))
            except Exception as e:   # e.g. the admin socket's context could not be made
                for ref in refs:
                    out.setdefault(ref.uid, (None, _reason(e, ref)))
        for uid, (_, err) in out.items():
            (log.warning if err else log.info)("%s %s: %s", what, uid, err or "done")
        return out

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, refs: Iterable[ClaimRef]) -> dict[str, Outcome]:
        return {uid: v if not err else Outcome(error=err)
                for uid, (v, err) in self._each("prepare", refs, "status", self._prepare).items()}

    def _prepare(self, admin: AdminClient, status: dict, ref: ClaimRef) -> Outcome:
        tenant = tenant_name(ref.uid)
        rec = self.records.claims.get(ref.uid)
        fresh = rec is None
        if fresh:      # an allocation never changes for a uid: the recorded one is the claim's
            devices = {n: int(d["total_memory"]) for n, d in status["devices"].items()}
            table, results = tenant_table(self.claims.get(ref), ref, self.pool, devices)
            rec = {"namespace": ref.namespace, "name": ref.name, "tenant": tenant, "table": table,
                   "results": [dataclasses.asdict(r) for r in results]}
            self.records.put(ref.uid, rec)       # first: a crash after tenant_add still finds it
        try:
            r = admin.call("tenant_add", tenant=tenant, table=rec["table"], replace=True)
        except KubecashError:
            if fresh:
                self.records.drop(ref.uid)       # nothing was made: the next prepare starts over
            raise
        if not r["served"]:
            raise ClaimError(f"tenant {tenant} was made but is not served: {'; '.join(r['warnings'])}")
        cdi_id = self._write_cdi(status["runtime_dir"], tenant)
        return Outcome([Result(**x) for x in rec["results"]], [cdi_id])

    # -- unprepare ----------------------------------------------------------------------------
    def unprepare(self, refs: Iterable[ClaimRef]) -> dict[str, str]:
        """Per claim uid: "" or its error. A claim never prepared (or already unprepared) is
        done: the kubelet repeats calls it did not see answered."""
        return {uid: err for uid, (_, err) in self._each(
            "unprepare", refs, "tenant_list", lambda admin, r, ref: self._unprepare(admin, r["tenants"], ref)).items()}

    def _unprepare(self, admin: AdminClient, listed: dict[str, Any], ref: ClaimRef) -> None:
        tenant = tenant_name(ref.uid)
        t = listed.get(tenant)
        if t is not None and t["source"] != "dynamic":
            raise ClaimError(f"tenant {tenant} is defined in the broker's quota file, not by this plugin: "
                             "left as it is")
        if t is not None:
            admin.call("tenant_remove", tenant=tenant)
            listed.pop(tenant)
        try:
            os.unlink(self.cdi_path(tenant))
        except FileNotFoundError:
            pass
        self.records.drop(ref.uid)

    # -- restart --------------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """At start: every recorded claim's tenant and CDI spec exist again (the broker may have
        set its state file aside; a spec may have been deleted). Tenants named like a claim's
        that no record knows are reported, not removed: the kubelet unprepares them by uid.
        Returns what it did or found, one line each; raises KubecashError if no broker answers."""
        done = []
        with self._lock, self.admin() as admin:
            status = admin.call("status")
            listed = admin.call("tenant_list")["tenants"]
            for uid, rec in sorted(self.records.claims.items()):
                tenant = rec["tenant"]
                try:
                    if tenant not in listed:
                        admin.call("tenant_add", tenant=tenant, table=rec["table"], replace=True)
                        done.append(f"claim {uid}: tenant {tenant} made again")
                    if not os.path.exists(self.cdi_path(tenant)):
                        self._write_cdi(status["runtime_dir"], tenant)
                        done.append(f"claim {uid}: CDI spec for {tenant} written again")
                except (KubecashError, ValueError, OSError) as e:
                    done.append(f"claim {uid}: tenant {tenant} cannot be restored: {e}")
            known = {rec["tenant"] for rec in self.records.claims.values()}
            for name, t in sorted(listed.items()):
                if name.startswith(TENANT_PREFIX) and t["source"] == "dynamic" and name not in known:
                    done.append(f"tenant {name} has no record of its claim (left for the kubelet to unprepare)")
        for line in done:
            log.warning("reconcile: %s", line)
        return done


def _reason(e: Exception, ref: ClaimRef) -> str:
    if isinstance(e, ClaimError):
        return str(e)
    if isinstance(e, (KubecashError, ValueError, OSError)):
        return f"claim {ref}: {e}"
    log.exception("claim %s: unexpected error", ref)
    return f"claim {ref}: internal error: {type(e).__name__}: {e}"
