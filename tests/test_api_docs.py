"""``/docs``: off by default; with DUPLEX_API_DOCS on, served from local files only (the
page renders offline: see test_browser_demo.py for it in Chromium)."""

from __future__ import annotations

import re
from typing import Any

import httpx


async def test_docs_off_by_default(live_server: Any) -> None:
    async with httpx.AsyncClient(base_url=live_server.base) as http:
        assert (await http.get("/docs")).status_code == 404
        assert (await http.get("/redoc")).status_code == 404


async def test_docs_served_from_local_assets(server_factory: Any) -> None:
    server = server_factory(api_docs=True)
    async with httpx.AsyncClient(base_url=server.base) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        # Every script, style and icon comes from this server: no CDN.
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert urls and not [u for u in urls if "://" in u or u.startswith("//")], urls
        for path in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
            asset = await http.get(path)
            assert asset.status_code == 200 and len(asset.content) > 10_000, path
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/client_tokens" in spec["paths"]
        assert (await http.get("/redoc")).status_code == 404
