"""FastAPI dependencies: the service of the app, and the caller's API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ._live import ServiceError
from ._service import Service
from ._store import ApiKey

_bearer = HTTPBearer(auto_error=False, description="an API key: corral keys create")


async def get_service(request: Request) -> Service:
    # async: on the loop, not a worker thread (a sync dependency takes one per request)
    service: Service = request.app.state.service
    return service


Svc = Annotated[Service, Depends(get_service)]


def authenticate(  # sync: a cache miss reads the database, in a worker thread
    service: Svc, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    """The caller's key (``Authorization: Bearer crl_…``), or 401."""
    key = service.store.authenticate(creds.credentials) if creds is not None else None
    if key is None:
        raise ServiceError(401, "unauthorized", "a valid API key is required")
    return key


Key = Annotated[ApiKey, Depends(authenticate)]
