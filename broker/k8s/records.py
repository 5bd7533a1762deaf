"""Prepared claims, kept across plugin restarts: `<state_dir>/dra-claims.json`.

The broker's dynamic tenants are the state that matters (a claim's tenant is named from its
uid, so unprepare finds it with or without this file); this record adds what the kubelet
does not resend and a restart needs: the claim's name, its tenant's table (to bring the
tenant back if the broker lost it), the devices returned and the CDI spec written. Written
before the tenant is made and removed after it is gone, atomically (state.write_atomic),
so a crash between leaves a record of a claim that may or may not be prepared: preparing
or unpreparing it again converges. An unreadable file is set aside and reported; the plugin
serves on with no records.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from .. import state

log = logging.getLogger("kubecash.dra")

RECORD_FILE = "dra-claims.json"
FORMAT = "kubecash.io/dra-claims"
VERSION = 1


class Records:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, RECORD_FILE)
        self.problem: str | None = None
        self.claims: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            return self._unusable(f"cannot be read: {e}")
        if (not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION
                or not isinstance(doc.get("claims"), dict)
                or not all(isinstance(v, dict) and isinstance(v.get("tenant"), str) for v in doc["claims"].values())):
            return self._unusable(f"is not a {FORMAT} version {VERSION} file")
        return doc["claims"]

    def _unusable(self, why: str) -> dict:
        aside = state.set_aside(self.path)
        self.problem = f"{self.path} {why}; " + (f"renamed to {aside}" if aside else "it could not be renamed")
        log.error("prepared-claim records: %s; serving with none (unprepare still finds tenants by claim uid)",
                  self.problem)
        return {}

    def _save(self, claims: dict[str, dict[str, Any]]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "claims": claims}
        state.write_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        self.claims = claims

    def put(self, uid: str, record: dict[str, Any]) -> None:
        if self.claims.get(uid) != record:
            self._save({**self.claims, uid: record})

    def drop(self, uid: str) -> None:
        if uid in self.claims:
            self._save({u: r for u, r in self.claims.items() if u != uid})
