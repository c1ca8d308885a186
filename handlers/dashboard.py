"""The live telemetry dashboard: static files, and the browser libraries it loads.

Routes (see ``dashboard_routes``):

* ``/`` and ``/dashboard`` redirect (302) to ``/dashboard/``; a URL fragment
  such as ``#token=...`` survives the redirect (browsers keep it).
* ``/dashboard/`` serves ``static/dashboard`` (``index.html`` by default) with
  a strict Content-Security-Policy: scripts, styles and fetches from this origin
  only, WebSockets to this host only, no inline code, no framing.
* ``/vendor/centrifuge/...`` and ``/vendor/uplot/...`` serve the ``dist``
  folders of the ``centrifuge`` and ``uplot`` npm packages straight from
  ``node_modules`` (installed by ``scripts/setup`` through ``npm ci``): no
  third-party code is copied into the repository. Without ``node_modules``
  they answer 503 with ``run scripts/setup (npm ci)`` instead of a bare 404,
  so a fresh checkout says what is missing.

Why StaticFileHandler and not a CDN: the dashboard must work on a closed
network, and the CSP stays ``'self'`` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Final

import tornado.web

REPO: Final = Path(__file__).resolve().parents[1]
STATIC_DIR: Final = REPO / "static" / "dashboard"
NODE_MODULES: Final = REPO / "node_modules"

#: npm package -> URL prefix under /vendor/ (each serves the package's ``dist``).
VENDOR_PACKAGES: Final = ("centrifuge", "uplot")

SETUP_HINT: Final = "run scripts/setup (npm ci) to install the dashboard's browser libraries"

# A Host header we are willing to echo into the CSP (name or IPv4/IPv6 literal, optional port).
_HOST_RE: Final = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")  # fullmatch


def content_security_policy(host: str) -> str:
    """The dashboard's CSP; ``host`` (the request's Host) is allowed for ws:/wss: only.

    ``'self'`` already covers same-host WebSockets in CSP Level 3 browsers; the
    explicit ``ws://host wss://host`` entries are for older ones. A Host that is
    not a plain host[:port] is left out rather than echoed.
    """
    connect = "'self'"
    if _HOST_RE.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


class _FileHandler(tornado.web.StaticFileHandler):
    """Tornado's static files, with a clean 404 for a path holding a NUL byte
    (``%00``): ``os.path.realpath`` raised, a 500 and an ERROR traceback per request."""

    def parse_url_path(self, url_path: str) -> str:
        if "\x00" in url_path:
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)


class DashboardFileHandler(_FileHandler):
    """``static/dashboard`` with the CSP and revalidate-every-time caching."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Content-Security-Policy", content_security_policy(self.request.host))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        # Not versioned URLs: let the browser keep a copy but ask (ETag) every time.
        self.set_header("Cache-Control", "no-cache")


class VendorFileHandler(_FileHandler):
    """One npm package's ``dist`` folder; 503 with a setup hint when it is not installed."""

    def prepare(self) -> None:
        # A stat per request, like StaticFileHandler's own: npm ci may run while we serve.
        self.installed = os.path.isdir(self.root)

    async def get(self, path: str, include_body: bool = True) -> None:
        if not self.installed:
            package = Path(self.root).parent.name
            self.set_status(503)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Content-Type-Options", "nosniff")
            message = f"{package} is not installed: {SETUP_HINT}\n"
            await self.finish(message if include_body else None)
            return
        await super().get(path, include_body)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")


def dashboard_routes(
    *, static_dir: Path = STATIC_DIR, node_modules: Path = NODE_MODULES
) -> list[tuple[str, type, dict[str, Any]]]:
    """Routes for the dashboard page and its vendored libraries (see the module docstring)."""
    rules: list[tuple[str, type, dict[str, Any]]] = [
        (r"/", tornado.web.RedirectHandler, {"url": "/dashboard/", "permanent": False}),
        (r"/dashboard", tornado.web.RedirectHandler, {"url": "/dashboard/", "permanent": False}),
        (
            r"/dashboard/(.*)",
            DashboardFileHandler,
            {"path": str(static_dir), "default_filename": "index.html"},
        ),
    ]
    for package in VENDOR_PACKAGES:
        rules.append(
            (
                rf"/vendor/{package}/(.*)",
                VendorFileHandler,
                {"path": str(node_modules / package / "dist")},
            )
        )
    return rules
