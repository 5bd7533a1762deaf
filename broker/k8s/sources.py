"""Where the plugin reads a claim: the API server (a live cluster), or a directory of claim
files (a node without one, and the tests). Either returns the ResourceClaim as the API's
JSON; a claim that cannot be had is a ClaimError saying why."""
from __future__ import annotations

import json
import os
from typing import Any, Protocol

from .claims import ClaimError, ClaimRef


class ClaimSource(Protocol):
    def get(self, ref: ClaimRef) -> dict[str, Any]: ...


class ApiClaims:
    """`GET /apis/resource.k8s.io/v1/namespaces/<ns>/resourceclaims/<name>`, through the
    official client; the JSON is kept as sent (a model would drop fields newer than it)."""

    def __init__(self, api_client: Any = None):
        from kubernetes import client
        self.api = client.ResourceV1Api(api_client)

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        try:
            resp = self.api.read_namespaced_resource_claim(ref.name, ref.namespace, _preload_content=False)
            return json.loads(resp.data)
        except ApiException as e:
            raise ClaimError(f"claim {ref}: the API server answered {e.status} {e.reason}") from None
        except (OSError, ValueError) as e:
            raise ClaimError(f"claim {ref}: cannot be read from the API server: {e}") from None


class FileClaims:
    """`<root>/<namespace>/<name>.json`: each the claim as the API server would return it."""

    def __init__(self, root: str):
        self.root = root

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        for part in (ref.namespace, ref.name):
            if not part or "/" in part or part in (".", ".."):
                raise ClaimError(f"claim {ref}: namespace and name must be plain names")
        path = os.path.join(self.root, ref.namespace, ref.name + ".json")
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise ClaimError(f"claim {ref}: not found ({path})") from None
        except (OSError, ValueError) as e:
            raise ClaimError(f"claim {ref}: cannot read {path}: {e}") from None
