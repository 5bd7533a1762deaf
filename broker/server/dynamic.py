"""Dynamic tenants: made, changed and removed at run time through the admin socket
(`brokerctl tenant add|remove|list`; the Kubernetes plugins), beside the quota file's.

A dynamic tenant is defined by the same table as a quota-file tenant and passes the same
validation (config.parse_tenant); its quotas count against the devices exactly as a file
tenant's. Names never collide: a dynamic tenant cannot take a file tenant's name, and a
reload whose file names a dynamic tenant is refused (admin.reload). Every change is written
to the state file (broker/state.py) before it is applied, so what runs is what a restart
brings back; a write that fails changes nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from typing import Any

from kubecash.client import protocol as P
from kubecash.client.errors import E, error_from_code

from .. import config as cfg
from .. import confine, state

log = logging.getLogger("kubecash.broker")


class DynamicTenants:
    """The Broker's dynamic tenants (a mixin: the state it uses is set up in core.Broker)."""

    def _load_dynamic(self) -> None:
        """At start: the state file's tenants join the configuration, all or none. An unusable
        file is set aside and reported (log, `brokerctl status`); the broker serves on."""
        path = self.state_path
        try:
            tenants = state.load(path, self.settings, len(self.devices))
            taken = sorted(set(tenants) & set(self.config.tenants))
            if taken:
                raise state.StateError(f"{path}: " + ", ".join(f"tenant '{n}'" for n in taken)
                                       + f" is also in the quota file {self.config.path}")
        except state.StateError as e:
            aside = state.set_aside(path)
            self.state_problem = {"error": str(e), "set_aside": aside, "at": time.time()}
            log.error("the state file is unusable, none of its dynamic tenants is served: %s; %s", e,
                      f"it was renamed to {aside}" if aside else "it could not be renamed (it stays, unread)")
            return
        self.dynamic = tenants
        self.config = dataclasses.replace(self.config, tenants={**self.config.tenants, **tenants})
        if tenants:
            log.info("%d dynamic tenant(s) from %s: %s", len(tenants), path, ", ".join(sorted(tenants)))

    def _commit_dynamic(self, tenants: dict[str, cfg.Tenant]) -> None:
        """Write the dynamic tenants to the state file; CudaError (nothing changed) if it fails."""
        try:
            state.save(self.state_path, tenants)
        except ValueError as e:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, f"cannot be kept in the state file: {e}") from None
        except OSError as e:
            raise error_from_code(E.CUDA_ERROR_OPERATING_SYSTEM,
                                  f"cannot write the state file {self.state_path}: {e.strerror or e}; "
                                  "nothing changed") from None
        file_tenants = {n: t for n, t in self.config.tenants.items() if n not in self.dynamic}
        self.dynamic = dict(tenants)
        self.config = dataclasses.replace(self.config, tenants={**file_tenants, **tenants})

    def _state_status(self) -> dict[str, Any]:
        return {"file": self.state_path, "dynamic": sorted(self.dynamic), "problem": self.state_problem}

    def _admin_tenant_add(self, msg: dict) -> dict:
        name = msg["tenant"]
        try:
            new = cfg.parse_tenant("tenant_add", name, msg["table"], self.settings, len(self.devices))
        except cfg.ConfigError as e:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE, str(e)) from None
        if name in self.config.tenants and name not in self.dynamic:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"tenant '{name}' is defined in the quota file {self.config.path}; "
                                  "a dynamic tenant cannot take its name")
        if any(r.config.name == name and r.executors for r in self._retired):
            # its executors, exiting, still clean up in the directory a new one would share
            raise error_from_code(E.CUDA_ERROR_NOT_READY, f"tenant '{name}' was removed and its executors "
                                  "are still exiting; try again in a moment")
        old = self.dynamic.get(name)
        if old is not None and old != new and not msg.get("replace", False):
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"dynamic tenant '{name}' exists with another definition; "
                                  "replace it (brokerctl tenant add --replace) or remove it first")
        if old != new:
            self._commit_dynamic({**self.dynamic, name: new})
        warnings = []
        t = self.tenants.get(name)
        if t is None:           # new, or not served yet (its directory had no room): try now
            why = self._add_tenant(new)
            if why is not None:
                warnings.append(f"tenant '{name}' is not served: {why}")
        elif t.config != new:
            warnings += self._change_tenant(t, new)
        for uid, names in cfg.shared_owners(self.config).items():
            if name in names:
                warnings.append(f"tenants {', '.join(names)} share owner uid {uid}: their containers "
                                "and executors are not isolated from each other")
                log.warning("%s", warnings[-1])
        log.info("dynamic tenant %s %s", name, "added" if old is None else "replaced" if old != new else "unchanged")
        return {"tenant": name, "created": old is None, "changed": old != new,
                "served": name in self.tenants, "warnings": warnings}

    def _admin_tenant_remove(self, msg: dict) -> dict:
        """Its sessions end and its executors stop (as evict), its socket and directory go (as
        a tenant the configuration no longer has: its file system is unmounted)."""
        name = msg["tenant"]
        if name not in self.dynamic:
            raise error_from_code(E.CUDA_ERROR_INVALID_VALUE,
                                  f"tenant '{name}' is defined in the quota file {self.config.path}; remove "
                                  "it there and reload" if name in self.config.tenants else
                                  f"no dynamic tenant '{name}'")
        self._commit_dynamic({n: t for n, t in self.dynamic.items() if n != name})
        t = self.tenants.get(name)
        ended = self._retire_tenant(t, "removed by the operator") if t is not None else 0
        self._allocated_uids.pop(name, None)
        self._remove_tenant_dir(name)
        log.info("dynamic tenant %s removed (%d sessions ended)", name, ended)
        return {"tenant": name, "sessions_ended": ended}

    def _admin_tenant_list(self, msg: dict) -> dict:
        out = {}
        for name, t in self.config.tenants.items():
            if name in self.tenants:        # as it runs now (brokerctl set changes it live)
                t = self.tenants[name].config
            try:
                table = cfg.tenant_table(t)
            except ValueError:      # a file tenant changed live past what a table says
                table = {}
            out[name] = {"source": "dynamic" if name in self.dynamic else "file",
                         "served": name in self.tenants, "table": table}
        return {"tenants": out, "state": self._state_status()}

    def _remove_tenant_dir(self, name: str) -> None:
        """A tenant no longer defined: its directory goes, with the file system mounted on it
        (what start() does for one a restart no longer finds)."""
        d = P.tenant_dir(self.runtime_dir, name)
        if confine.can_confine() and self.settings.mount_namespace:
            confine.unmount_tenant_fs_under(d, namespace=self.settings.mount_namespace)
        shutil.rmtree(d, ignore_errors=True)
