"""The E2B-compatible API: agents written for E2B's SDKs run on corral unchanged.

Mounted by ``create_app`` over the same ``Service`` as the native API (keys,
per-key isolation, quotas, path rules: one service layer, not a copy):

- ``/e2b/api``: the control plane (``X-API-KEY`` is a corral key, or it in
  E2B's ``e2b_<hex>`` form): create, get, list, kill, timeout, connect,
  pause and resume (the freezer), metrics, network rules (``_control``).
- ``/e2b/sandbox``: sandbox traffic, routed by the ``E2b-Sandbox-Id`` and
  ``E2b-Sandbox-Port`` headers the SDKs send with ``E2B_SANDBOX_URL`` (or by
  the access token alone): port 49983 is envd's protocol (Connect RPC with
  the JSON codec for processes, PTYs (corral terminals) and the filesystem,
  directory watches in
  ``_watch``, ``/files`` for bytes; ``_envd``), port 49999 the code
  interpreter's (``/execute`` NDJSON, ``/contexts``; ``_jupyter``). Each
  request carries the sandbox's access token (``X-Access-Token`` or
  ``E2B-Traffic-Access-Token``), handed out by create and connect.
- ``/files`` at the root: signed download and upload URLs, which the SDKs
  build there (the signature names the sandbox).

What is not supported (template builds, volumes, auto-pause, snapshots,
stdin streams, root) answers with an error that says so, never a no-op.
"""

from __future__ import annotations

from ._control import router as control_router
from ._envd import root_router as files_router
from ._envd import router as envd_router
from ._jupyter import router as jupyter_router

ROUTERS = (control_router, envd_router, jupyter_router, files_router)

__all__ = ["ROUTERS"]
