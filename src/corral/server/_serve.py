"""``corral serve`` and ``corral keys``: the data directory, the keys, the server process.

The server binds 127.0.0.1 by default. A non-loopback address is refused
unless API keys exist (created with ``corral keys create``): a sandbox service
open to the network without keys would run anyone's code. On loopback with no
keys yet, the first start creates one named ``local`` and writes it to
``<data-dir>/local.key`` (mode 0600), so the server is never keyless.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corral._errors import CorralError

if TYPE_CHECKING:
    from ._store import Store

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


def open_store(data_dir: Path) -> Store:
    """The data directory's store, created if need be. Raises ``CorralError``
    with one line when the directory or its database cannot be used."""
    import sqlalchemy.exc

    from ._store import Store

    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        return Store.in_dir(data_dir)
    except OSError as exc:
        raise CorralError(
            f"cannot use the data directory {data_dir}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(data_dir) else "")
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise CorralError(f"cannot open {data_dir / 'corral.db'}: {cause}") from None


def _listen(host: str, port: int) -> socket.socket:
    """A bound listening socket (uvicorn takes it), or ``CorralError`` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _raise_nofile() -> None:
    """The soft RLIMIT_NOFILE up to the hard one (as Go's runtime does at
    start): each live box holds about 7 descriptors in the server (its
    channel, stderr, pidfd, cgroup and workspace handles), so the usual soft
    1024 would end a server near 140 boxes. benchmarks/bench_idle.py ran 1000."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling then
        with contextlib.suppress(OSError, ValueError):
            target = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(
    *,
    data_dir: Path,
    host: str,
    port: int,
    retention_s: float,
    max_upload_bytes: int,
    allow_private_network: bool = False,
    log_level: str = "info",
    backend: str = "bwrap",
    pools: Sequence[str] = (),
    pool_max_starting: int | None = None,
) -> int:
    """Run the server until SIGINT/SIGTERM; 0 after a clean stop. Start-up
    failures (the data directory, the database, the address, a backend
    that is not there) raise ``CorralError`` with one line, not a traceback.
    ``backend`` starts every box (``corral.backends``: bwrap by default).
    ``pools``: warm pools, one ``--pool`` spec each (``_pools.PoolSpec.parse``);
    ``pool_max_starting``: pooled boxes started at once across all pools."""
    import uvicorn

    from corral.backends import get_backend

    from ._app import create_app
    from ._pools import PoolSpec
    from ._service import Service, ServiceConfig
    from ._workspace import prepare_data_dir

    get_backend(backend)  # HostToolMissing (one line) before anything is opened
    _raise_nofile()
    pool_specs = tuple(PoolSpec.parse(text) for text in pools)
    if pool_max_starting is not None and pool_max_starting < 1:
        raise CorralError("--pool-max-starting: expected a whole number >= 1")
    store = open_store(data_dir)
    sock = None
    try:
        if not store.list_keys() and not is_loopback(host):
            raise CorralError(
                f"refusing to listen on {host}: no API keys exist. Create one first with "
                f"`corral keys create --name NAME --data-dir {data_dir}`"
            )
        try:
            prepare_data_dir(data_dir, data_dir / "workspaces")
        except OSError as exc:
            raise CorralError(
                f"cannot use the data directory {data_dir}: {exc.strerror or exc}"
            ) from None
        sock = _listen(host, port)
        if not store.list_keys():
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
                backend=backend,
                pools=pool_specs,
                pool_max_starting=pool_max_starting,
            ),
        )
        config = uvicorn.Config(
            create_app(service),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            access_log=False,
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if sock is not None:
            sock.close()
        store.close()
    return 0
