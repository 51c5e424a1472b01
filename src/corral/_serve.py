"""``corral serve`` and ``corral keys``: the data directory, the keys, the server process.

The server binds 127.0.0.1 by default. A non-loopback address is refused
unless API keys exist (created with ``corral keys create``): a sandbox service
open to the network without keys would run anyone's code. On loopback with no
keys yet, the first start creates one named ``local`` and writes it to
``<data-dir>/local.key`` (mode 0600), so the server is never keyless.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from ._errors import CorralError

DEFAULT_PORT = 8000


def default_data_dir() -> Path:
    """Root: /var/lib/corral/server (every box's uid must reach its workspace,
    and /root is 0700). Others: $XDG_DATA_HOME/corral/server."""
    if os.geteuid() == 0:
        return Path("/var/lib/corral/server")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral" / "server"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    *,
    data_dir: Path,
    host: str,
    port: int,
    retention_s: float,
    max_upload_bytes: int,
    allow_private_network: bool = False,
    log_level: str = "info",
) -> int:
    import uvicorn

    from ._api import create_app
    from ._service import Service, ServiceConfig
    from ._store import Store

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    store = Store.in_dir(data_dir)
    if not store.list_keys():
        if not is_loopback(host):
            raise CorralError(
                f"refusing to listen on {host}: no API keys exist. Create one first with "
                f"`corral keys create --name NAME --data-dir {data_dir}`"
            )
        _, token = store.create_key("local")
        key_file = data_dir / "local.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        print(f"corral: created API key 'local' in {key_file}", file=sys.stderr)
    service = Service(
        store,
        ServiceConfig(
            data_dir=data_dir,
            retention_s=retention_s,
            max_upload_bytes=max_upload_bytes,
            allow_private_network=allow_private_network,
        ),
    )
    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        access_log=False,
    )
    uvicorn.Server(config).run()
    store.close()
    return 0
