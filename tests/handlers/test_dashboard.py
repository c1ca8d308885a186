"""The dashboard's static routes: redirects, CSP, vendored npm files, the 503 hint.

The page itself is exercised in a real browser by ``tests/browser``; these tests
pin the HTTP side (and that the page needs nothing the CSP forbids) without one.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.web
from tornado.httpserver import HTTPServer

from handlers.dashboard import (
    NODE_MODULES,
    SETUP_HINT,
    STATIC_DIR,
    content_security_policy,
    dashboard_routes,
)
from tests.helpers.logs import expect_log
from tests.helpers.services import free_port, unavailable


async def get(url: str, **kw: Any) -> tornado.httpclient.HTTPResponse:
    http = tornado.httpclient.AsyncHTTPClient()
    return await http.fetch(url, raise_error=False, follow_redirects=False, **kw)


@pytest.mark.parametrize("path", ["/", "/dashboard"])
async def test_redirects_to_dashboard(squall, path):
    sq = await squall()
    resp = await get(sq.http_url + path)
    assert resp.code == 302
    assert resp.headers["Location"] == "/dashboard/"


async def test_dashboard_page_has_strict_csp(squall):
    sq = await squall()
    resp = await get(sq.http_url + "/dashboard/")
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    csp = resp.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    host = f"127.0.0.1:{sq.port}"
    assert directives["connect-src"] == f"'self' ws://{host} wss://{host}"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_csp_does_not_echo_a_strange_host():
    csp = content_security_policy("evil.example; script-src *")
    assert "evil" not in csp
    assert "connect-src 'self';" in csp
    assert "ws://[::1]:8000" in content_security_policy("[::1]:8000")
    assert "connect-src 'self';" in content_security_policy("example.com\n")


class _Inline(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block, and the vendor URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "style":
            self.blocked.append("<style>")
        if tag == "script" and not a.get("src"):
            self.blocked.append("inline <script>")
        self.blocked += [f"{tag} {k}=" for k in a if k == "style" or k.startswith("on")]
        for key in ("src", "href"):
            if (a.get(key) or "").startswith("/vendor/"):
                self.urls.append(str(a[key]))


def vendor_urls() -> list[str]:
    """Every /vendor/ URL the page and app.js load."""
    parser = _Inline()
    parser.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    app_js = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    return parser.urls + re.findall(r"""['"](/vendor/[^'"]+)['"]""", app_js)


def test_page_needs_nothing_the_csp_blocks():
    parser = _Inline()
    parser.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    assert parser.blocked == []
    assert "innerHTML" not in (STATIC_DIR / "app.js").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "path", ["/dashboard/index.html%00", "/dashboard/%00", "/vendor/uplot/%00", "/vendor/x%00.js"]
)
async def test_a_nul_byte_in_a_file_path_is_a_404(squall, path):
    """%00 in a static path made os.path.realpath raise: a 500 and an ERROR traceback
    for anyone who asked. A 404 now (the test fails on any ERROR line)."""
    sq = await squall()
    # (a vendor route without node_modules says so with 503 before it reads the path)
    expected = 503 if path.startswith("/vendor/") and not NODE_MODULES.is_dir() else 404
    with expect_log("tornado.access", rf"^{expected} GET "):
        resp = await get(sq.http_url + path)
    assert resp.code == expected, (path, resp.code)


async def test_vendor_files_are_served_from_node_modules(squall):
    if not (NODE_MODULES / "centrifuge").is_dir() or not (NODE_MODULES / "uplot").is_dir():
        unavailable(f"node_modules missing: {SETUP_HINT}")
    sq = await squall()
    urls = vendor_urls()
    assert {u.split("/")[2] for u in urls} == {"centrifuge", "uplot"}
    for url in urls:
        resp = await get(sq.http_url + url)
        assert resp.code == 200, url
        kind = "text/css" if url.endswith(".css") else "javascript"
        assert kind in resp.headers["Content-Type"], (url, resp.headers["Content-Type"])
    resp = await get(sq.http_url + "/vendor/uplot/..%2F..%2F..%2Fpackage.json")
    assert resp.code in (403, 404)


async def test_vendor_routes_say_how_to_install_when_node_modules_is_missing(
    io_loop, tmp_path: Path
):
    app = tornado.web.Application(dashboard_routes(node_modules=tmp_path / "node_modules"))
    server = HTTPServer(app)
    port = free_port()
    server.listen(port, address="127.0.0.1")
    try:
        # A 5xx is logged at ERROR by tornado.access: an operator should see it.
        with expect_log("tornado.access", r"^503 (GET|HEAD) /vendor/"):
            for url in ("/vendor/centrifuge/centrifuge.js", "/vendor/uplot/uPlot.esm.js"):
                resp = await get(f"http://127.0.0.1:{port}{url}")
                assert resp.code == 503
                assert "run scripts/setup (npm ci)" in resp.body.decode()
            resp = await get(f"http://127.0.0.1:{port}/vendor/uplot/x.js", method="HEAD")
            assert resp.code == 503
        # The page itself still loads (and then tells the user what is missing).
        assert (await get(f"http://127.0.0.1:{port}/dashboard/")).code == 200
    finally:
        server.stop()
        await server.close_all_connections()
