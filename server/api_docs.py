"""The app object, with or without the OpenAPI explorer at ``/docs`` (``DUPLEX_API_DOCS``).

FastAPI's own ``/docs`` page loads Swagger UI from a CDN, so it is blank offline and
makes browsers fetch code from a third party. Duplex serves it only when asked, and then
from the Swagger UI files the ``fastapi-offline`` package ships (under
``/docs-assets``); ReDoc stays off.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ASSETS_URL = "/docs-assets"


def make_app(api_docs: bool, **kwargs: Any) -> FastAPI:
    if not api_docs:
        return FastAPI(docs_url=None, redoc_url=None, **kwargs)
    from fastapi_offline import FastAPIOffline

    return FastAPIOffline(docs_url="/docs", redoc_url=None, static_url=ASSETS_URL, **kwargs)
