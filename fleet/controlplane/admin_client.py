"""A client of the admin API (``fleet ... --server https://HOST:8443``).

It authenticates with an admin bundle: a directory holding ``cert.pem``, ``key.pem`` and
``root.crt`` (``DIR/admin/`` of the workspace, copied to the operator's machine). The server's
certificate must be issued by that root and carry the host name of the URL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.tls import device_tls_context


class AdminApiError(FleetError):
    """The admin API refused a request; the message is the server's (it names the field)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = 2 if status in (400, 404, 409) else 1


class AdminClient:
    """Calls one control plane's admin API with the admin bundle in ``admin_dir``."""

    def __init__(self, url: str, admin_dir: Path, *, timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise UsageError(f"invalid --server {url!r}: use https://HOST:PORT")
        self.url = url.rstrip("/")
        self.timeout = timeout
        files = [admin_dir / name for name in ("cert.pem", "key.pem", "root.crt")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UsageError(
                f"admin bundle incomplete: {', '.join(missing)} missing (copy DIR/admin/ of the "
                "workspace and pass it with --admin)"
            )
        self._context = device_tls_context(
            files[2], files[0], files[1], device_id=f"admin bundle {admin_dir}"
        )

    def get(self, path: str, **query: str | None) -> Any:
        params = {k: v for k, v in query.items() if v is not None}
        suffix = f"?{urllib.parse.urlencode(params)}" if params else ""
        return self._call("GET", path + suffix, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, {k: v for k, v in body.items() if v is not None})

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise AdminApiError(exc.code, f"{self.url}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetError(f"cannot reach the admin API at {self.url}: {reason}") from None
