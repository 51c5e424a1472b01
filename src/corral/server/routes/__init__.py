"""The API's routes, one router per resource."""

from __future__ import annotations

from fastapi import APIRouter

from . import code, commands, files, network, sandboxes, server, terminals

ROUTERS: tuple[APIRouter, ...] = (
    server.router,
    sandboxes.router,
    code.router,
    commands.router,
    terminals.router,
    files.router,
    network.router,
)
