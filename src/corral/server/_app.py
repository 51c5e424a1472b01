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
from .routes import ROUTERS


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
    )
    app.state.service = service
    service.metrics.counts = service.store.count_by_state
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


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
