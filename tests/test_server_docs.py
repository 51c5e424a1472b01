"""``/docs`` is served whole by the server: no CDN, no third-party script."""

from __future__ import annotations

import os
import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from .server_helpers import serving

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server tests run as root here")


def test_the_docs_page_loads_swagger_ui_from_this_server_only() -> None:
    with serving() as server:
        page = httpx.get(f"{server.url}/docs")
        assert page.status_code == 200
        assert "SwaggerUIBundle" in page.text
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
        urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", page.text)
        assert any(u.endswith(".js") for u in urls), urls
        assert any(u.endswith(".css") for u in urls), urls
        origin = urlsplit(server.url).netloc
        for url in urls:
            absolute = urljoin(f"{server.url}/docs", url)
            assert urlsplit(absolute).netloc == origin, f"{url} is not on this server"
            asset = httpx.get(absolute)
            assert asset.status_code == 200, url
            assert asset.content, url
        # no third-party origin anywhere in the page, not even in a string
        assert not re.search(r"https?://(?!127\.0\.0\.1)", page.text), page.text
        assert httpx.get(f"{server.url}/redoc").status_code == 404  # ReDoc needs a CDN
