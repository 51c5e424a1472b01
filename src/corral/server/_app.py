"""The HTTP API of ``corral serve`` (FastAPI on uvicorn): the app factory.

Every route but ``/health`` needs an API key (``Authorization: Bearer crl_…``);
a key sees only its own sandboxes (another key's are 404, as if absent).
Errors are JSON ``{"error": {"code", "message"}}`` with a stable code (see
``_http``). Streams (code, command output) are NDJSON: one JSON object a line,
as it happens.

The routes (``routes/``, one router per resource) are thin: they parse, call
the service (``_service.Service``, and ``_live.Live`` for one sandbox), and
shape the reply (``_models``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from corral import __version__

from ._http import BodyLimit, install_error_handlers
from ._service import Service
from .e2b import ROUTERS as E2B_ROUTERS
from .routes import ROUTERS
from .ui import install as install_ui


def create_app(service: Service, *, max_request_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app over ``service``, which it starts and stops with its lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="corral",
        version=__version__,
        summary="Isolated, stateful, resource-limited sandboxes over HTTP",
        lifespan=lifespan,
        docs_url=None,  # served by _docs, from installed assets
        redoc_url=None,  # ReDoc comes only from a CDN: not offered
    )
    app.state.service = service
    service.metrics.counts = service.store.count_by_state
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    for router in E2B_ROUTERS:  # the E2B-compatible API, over the same service
        app.include_router(router)
    _docs(app)
    install_ui(app)  # the dashboard at /ui (not in the OpenAPI)
    return app


def _docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the installed ``swagger-ui-bundle-v2`` package,
    not a CDN: the page works offline and runs no third-party script."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="corral API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
            oauth2_redirect_url=None,
        )


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, as ``docs/openapi.json`` holds it."""
    import tempfile
    from pathlib import Path

    from ._service import ServiceConfig
    from ._store import Store

    service = Service(Store("sqlite://"), ServiceConfig(data_dir=Path(tempfile.gettempdir())))
    return create_app(service).openapi()


if __name__ == "__main__":  # python -m corral.server._app > docs/openapi.json
    json.dump(openapi_document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
