"""The management API calls that grant access: a virtual host, users, permissions.

The standard library's HTTP client: `apply` runs once per bring-up as a command, so a
blocking call is what it needs, and no HTTP library gains a second home. A cluster's
nodes (comma-separated URLs) are tried in order until one answers.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from autoscaler.queue_metrics import management_nodes


class AccessSetupFailed(Exception):
    """The management API refused or could not take a call; the message names it."""


class ManagementAdmin:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self._nodes = management_nodes(base_url)
        self._timeout_s = timeout_s

    def whoami(self) -> str:
        answer = self._call("GET", "/api/whoami")
        return str(answer["name"])

    def ensure_vhost(self, vhost: str) -> None:
        self._call("PUT", f"/api/vhosts/{quote(vhost, safe='')}", {})

    def ensure_user(self, user: str, password: str, tags: tuple[str, ...]) -> None:
        """Create the user, or set its password and tags to these (a re-run rotates them)."""
        self._call(
            "PUT", f"/api/users/{quote(user, safe='')}", {"password": password, "tags": ",".join(tags)}
        )

    def grant(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        path = f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}"
        self._call("PUT", path, {"configure": configure, "write": write, "read": read})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        failures = []
        for node in self._nodes:
            credentials = base64.b64encode(f"{node.username}:{node.password}".encode()).decode()
            request = urllib.request.Request(
                node.base_url + path,
                method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Basic {credentials}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                # The node answered: another node would answer the same.
                detail = exc.read().decode(errors="replace")[:300]
                raise AccessSetupFailed(f"{method} {path} on {node.shown}: HTTP {exc.code} {detail}") from exc
            except (urllib.error.URLError, OSError) as exc:
                failures.append(f"{node.shown}: {exc}")
                continue
            return json.loads(raw) if raw else None
        raise AccessSetupFailed(f"{method} {path}: no management API answered ({'; '.join(failures)})")
