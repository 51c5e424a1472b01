"""The dashboard of ``corral serve`` at ``/ui``: server-rendered pages, no script.

Jinja2 templates (autoescaped: every string on these pages may come from
untrusted code), one stylesheet, both shipped in this package: nothing comes
from a CDN and the page runs no script at all, so the Content-Security-Policy
can forbid every script (``script-src 'none'``). Actions are plain HTML forms
(POST, then a redirect).

The session is the caller's API key in a cookie (``HttpOnly``,
``SameSite=Strict``, ``Path=/ui``); a key sees only its own sandboxes, exactly
as in the API (the pages call the same ``Service``). Every POST carries a CSRF
token derived from the key and is refused when the browser says it came from
another site (``Origin``/``Sec-Fetch-Site``).
"""

from __future__ import annotations

from ._routes import install

__all__ = ["install"]
