"""The dashboard of ``corral serve`` at ``/ui``: server-rendered pages.

Jinja2 templates (autoescaped: every string on these pages may come from
untrusted code), one stylesheet, both shipped in this package: nothing comes
from a CDN. Every page but a sandbox's runs no script, so its
Content-Security-Policy forbids every script (``script-src 'none'``). Actions
are plain HTML forms (POST, then a redirect).

A sandbox's page runs two static scripts of this package (``script-src
'self'``, nothing inline): ``usage.js`` redraws its usage charts (SVG drawn by
the server) from ``usage.json``, and ``terminal.js`` opens a shell in the box
with xterm.js (vendored: ``static/xterm.mjs``, pinned by
``scripts/vendor_xterm.py``) over a websocket to
``/ui/sandboxes/{id}/terminal``, which checks ``Origin``, the session and the
CSRF token. The box's output is drawn as terminal text, never as HTML.

The session is the caller's API key in a cookie (``HttpOnly``,
``SameSite=Strict``, ``Path=/ui``); a key sees only its own sandboxes, exactly
as in the API (the pages call the same ``Service``). Every POST carries a CSRF
token derived from the key and is refused when the browser says it came from
another site (``Origin``/``Sec-Fetch-Site``).
"""

from __future__ import annotations

from ._routes import install

__all__ = ["install"]
