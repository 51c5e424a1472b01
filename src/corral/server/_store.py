"""What ``corral serve`` must never lose: sandboxes, API keys, quotas, the audit log.

SQLAlchemy Core over SQLite in WAL mode (one file in the data directory), so
another database can follow by changing the URL. WAL with ``synchronous=NORMAL``
survives a ``kill -9`` of the server (a committed row is in the log); only a
power cut may lose the last transactions.

API keys are ``crl_<id>_<secret>``: the id finds the row, the secret is stored
only as its SHA-256 (a 256-bit random secret needs no slow hash: there is
nothing to brute-force) and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

_meta = sa.MetaData()

keys_table = sa.Table(
    "api_keys",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("max_sandboxes", sa.Integer),
    sa.Column("max_memory_bytes", sa.BigInteger),
    sa.Column("max_lifetime_s", sa.Float),
    sa.Column("max_disk_bytes", sa.BigInteger),
)

sandboxes_table = sa.Table(
    "sandboxes",
    _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # running | ended
    sa.Column("end_reason", sa.String(32)),
    sa.Column("end_detail", sa.Text),
    sa.Column("limit_hit", sa.String(16)),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("runtime", sa.String(100)),
    sa.Column("memory_bytes", sa.BigInteger),
    sa.Column("disk_bytes", sa.BigInteger),  # its limit: reserved while it runs
    sa.Column("retained_bytes", sa.BigInteger),  # its workspace's size once ended
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("idle_timeout_s", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("retain_until", sa.Float),
    sa.Column("purged", sa.Boolean, nullable=False, default=False),
    sa.Column("instance", sa.String(32), nullable=False),  # which server process ran it
)

audit_table = sa.Table(
    "audit_log",
    _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("key_id", sa.String(32), index=True),
    sa.Column("sandbox_id", sa.String(32), index=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)


_AUTH_CACHE_S = 2.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    max_sandboxes: int | None
    max_memory_bytes: int | None
    max_lifetime_s: float | None
    max_disk_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxRow:
    seq: int
    id: str
    key_id: str
    state: str
    end_reason: str | None
    end_detail: str | None
    limit_hit: str | None
    policy: dict[str, Any]
    metadata: dict[str, str]
    runtime: str | None
    memory_bytes: int | None
    disk_bytes: int | None
    retained_bytes: int | None
    created_at: float
    expires_at: float | None
    idle_timeout_s: float | None
    ended_at: float | None
    retain_until: float | None
    purged: bool
    instance: str


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    def __init__(self, url: str) -> None:
        self.engine: Engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _meta.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._auth_cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._audit_queue: list[dict[str, Any]] = []
        self._audit_writing = False
        self._stopping = False
        self._audit_ready = threading.Condition()
        self._audit_writer = threading.Thread(
            target=self._write_audit, name="corral-audit", daemon=True
        )
        self._audit_writer.start()

    @classmethod
    def in_dir(cls, data_dir: Path) -> Store:
        """The store of ``data_dir/corral.db``, private to this user from its
        first byte: it holds every tenant's policies (and the env secrets in
        them), metadata, audit text and key hashes. Raises ``OSError`` when the
        directory cannot be used."""
        path = data_dir / "corral.db"
        # umask around the first open: SQLite creates the file, then -wal and
        # -shm (which take the database file's mode); no moment of 0644
        old = os.umask(0o077)
        try:
            _private(path)
            return cls(f"sqlite:///{path}")
        finally:
            os.umask(old)

    def close(self) -> None:
        with self._audit_ready:
            self._stopping = True
            self._audit_ready.notify_all()
        self._audit_writer.join()
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- keys ----------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        max_sandboxes: int | None = None,
        max_memory_bytes: int | None = None,
        max_lifetime_s: float | None = None,
        max_disk_bytes: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its token (shown once: only its hash is kept)."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(
            key_id,
            name,
            time.time(),
            max_sandboxes,
            max_memory_bytes,
            max_lifetime_s,
            max_disk_bytes,
        )
        with self._tx() as conn:
            conn.execute(
                keys_table.insert().values(
                    id=key.id,
                    name=name,
                    secret_sha256=_sha256(secret),
                    created_at=key.created_at,
                    max_sandboxes=max_sandboxes,
                    max_memory_bytes=max_memory_bytes,
                    max_lifetime_s=max_lifetime_s,
                    max_disk_bytes=max_disk_bytes,
                )
            )
        return key, f"crl_{key_id}_{secret}"

    def authenticate(self, token: str) -> ApiKey | None:
        """The key of ``token``, or None. Answers are cached for ``_AUTH_CACHE_S``
        (keyed by the token's hash): a revocation takes effect within that."""
        digest = _sha256(token)
        now = time.monotonic()
        cached = self._auth_cache.get(digest)
        if cached is not None and now - cached[0] < _AUTH_CACHE_S:
            return cached[1]
        key = self._authenticate(token)
        if len(self._auth_cache) > 10_000:  # a flood of bad tokens must not grow it forever
            self._auth_cache.clear()
        self._auth_cache[digest] = (now, key)
        return key

    def _authenticate(self, token: str) -> ApiKey | None:
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "crl" or len(token) > 200:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                keys_table.select().where(
                    keys_table.c.id == parts[1], keys_table.c.revoked_at.is_(None)
                )
            ).first()
        # constant-time: a timing difference must not reveal a hash prefix
        if row is None or not hmac.compare_digest(row.secret_sha256, _sha256(parts[2])):
            return None
        return _key(row)

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                keys_table.select().where(keys_table.c.revoked_at.is_(None))
            ).fetchall()
        return [_key(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._tx() as conn:
            done = conn.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id, keys_table.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        self._auth_cache.clear()
        return done.rowcount > 0

    # -- sandboxes -------------------------------------------------------------------

    def insert_sandbox(self, **values: Any) -> None:
        with self._tx() as conn:
            conn.execute(sandboxes_table.insert().values(state="running", purged=False, **values))

    def get_sandbox(self, sandbox_id: str) -> SandboxRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sandboxes_table.select().where(sandboxes_table.c.id == sandbox_id)
            ).first()
        return _sandbox(row) if row is not None else None

    def list_sandboxes(
        self,
        *,
        key_id: str | None = None,
        state: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[SandboxRow]:
        """Newest first; ``before_seq`` pages on (keyset paging: stable under inserts)."""
        t = sandboxes_table
        query = t.select().order_by(t.c.seq.desc()).limit(limit)
        if key_id is not None:
            query = query.where(t.c.key_id == key_id)
        if state is not None:
            query = query.where(t.c.state == state)
        if before_seq is not None:
            query = query.where(t.c.seq < before_seq)
        for name, value in (metadata or {}).items():
            query = query.where(t.c.metadata[name].as_string() == value)
        with self.engine.connect() as conn:
            return [_sandbox(r) for r in conn.execute(query).fetchall()]

    def running_usage(self, key_id: str) -> tuple[int, int]:
        """How many sandboxes the key has running, and their memory limits in total."""
        t = sandboxes_table
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.memory_bytes), 0))
                .select_from(t)
                .where(t.c.key_id == key_id, t.c.state == "running")
            ).one()
        return int(row[0]), int(row[1])

    def disk_usage(self, key_id: str) -> int:
        """Bytes the key's sandboxes take or may take: a running one its disk
        limit, an ended one its retained workspace (its limit until measured)."""
        t = sandboxes_table
        size = sa.case(
            (t.c.state == "running", t.c.disk_bytes),
            else_=sa.func.coalesce(t.c.retained_bytes, t.c.disk_bytes),
        )
        with self.engine.connect() as conn:
            total = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(size), 0))
                .select_from(t)
                .where(t.c.key_id == key_id, ~t.c.purged)
            ).scalar_one()
        return int(total)

    def set_retained(self, sandbox_id: str, size: int) -> None:
        with self._tx() as conn:
            conn.execute(
                sandboxes_table.update()
                .where(sandboxes_table.c.id == sandbox_id)
                .values(retained_bytes=size)
            )

    def count_by_state(self) -> dict[str, int]:
        """Sandboxes by state (``ended`` counts those still retained)."""
        t = sandboxes_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.state, sa.func.count()).where(~t.c.purged).group_by(t.c.state)
            ).fetchall()
        return {str(state): int(n) for state, n in rows}

    def set_expiry(self, sandbox_id: str, expires_at: float | None) -> None:
        with self._tx() as conn:
            conn.execute(
                sandboxes_table.update()
                .where(sandboxes_table.c.id == sandbox_id)
                .values(expires_at=expires_at)
            )

    def end_sandbox(
        self,
        sandbox_id: str,
        *,
        reason: str,
        detail: str | None,
        limit_hit: str | None,
        retain_until: float,
    ) -> bool:
        """Record the end (once: the first reason wins); False if it had ended already."""
        t = sandboxes_table
        with self._tx() as conn:
            done = conn.execute(
                t.update()
                .where(t.c.id == sandbox_id, t.c.state == "running")
                .values(
                    state="ended",
                    end_reason=reason,
                    end_detail=detail,
                    limit_hit=limit_hit,
                    ended_at=time.time(),
                    retain_until=retain_until,
                )
            )
        return done.rowcount > 0

    def due_for_purge(self, now: float) -> list[SandboxRow]:
        t = sandboxes_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                t.select().where(t.c.state == "ended", ~t.c.purged, t.c.retain_until < now)
            ).fetchall()
        return [_sandbox(r) for r in rows]

    def mark_purged(self, sandbox_id: str) -> None:
        with self._tx() as conn:
            conn.execute(
                sandboxes_table.update()
                .where(sandboxes_table.c.id == sandbox_id)
                .values(purged=True)
            )

    # -- audit -----------------------------------------------------------------------

    def audit(
        self, action: str, *, key_id: str | None, sandbox_id: str | None, **detail: Any
    ) -> None:
        """Queue an entry; a writer thread commits the queue in batches. A request
        does not wait for the disk (a ``kill -9`` loses at most the entries of the
        last moment, never a sandbox's state, which is written synchronously)."""
        entry = {
            "time": time.time(),
            "key_id": key_id,
            "sandbox_id": sandbox_id,
            "action": action,
            "detail": detail,
        }
        with self._audit_ready:
            self._audit_queue.append(entry)
            self._audit_ready.notify()

    def flush(self) -> None:
        """Wait until every queued audit entry is committed."""
        with self._audit_ready:
            while self._audit_queue or self._audit_writing:
                self._audit_ready.wait(0.05)

    def _write_audit(self) -> None:
        while True:
            with self._audit_ready:
                while not self._audit_queue and not self._stopping:
                    self._audit_ready.wait()
                if not self._audit_queue and self._stopping:
                    return
                batch, self._audit_queue = self._audit_queue, []
                self._audit_writing = True
            try:
                with self._tx() as conn:
                    conn.execute(audit_table.insert(), batch)
            except Exception:  # the log must not take the server down; say so
                logging.getLogger("corral.serve").exception("lost %d audit entries", len(batch))
            finally:
                with self._audit_ready:
                    self._audit_writing = False
                    self._audit_ready.notify_all()

    def audit_log(
        self,
        *,
        key_id: str,
        sandbox_id: str | None = None,
        action: str | None = None,
        limit: int = 100,
        after_seq: int = 0,
    ) -> list[dict[str, Any]]:
        """Oldest first from ``after_seq``."""
        self.flush()
        t = audit_table
        query = (
            t.select()
            .where(t.c.key_id == key_id, t.c.seq > after_seq)
            .order_by(t.c.seq)
            .limit(limit)
        )
        if sandbox_id is not None:
            query = query.where(t.c.sandbox_id == sandbox_id)
        if action is not None:
            query = query.where(t.c.action == action)
        with self.engine.connect() as conn:
            return [
                {
                    "seq": r.seq,
                    "time": r.time,
                    "sandbox_id": r.sandbox_id,
                    "action": r.action,
                    "detail": r.detail,
                }
                for r in conn.execute(query).fetchall()
            ]


def _private(db: Path) -> None:
    """Create ``db`` 0600, or repair an existing one (and its -wal, -shm,
    -journal) that other users could read, saying so."""
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return
    except FileExistsError:
        pass
    for path in (db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(path, 0o600)
            logging.getLogger("corral.serve").warning(
                "corral: %s was readable by other users (mode %o): it is 0600 now; "
                "until now any local user could read its keys' hashes, policies and audit log",
                path,
                mode,
            )


def _add_missing_columns(engine: Engine) -> None:
    """A database of an older corral: add the (nullable) columns it lacks."""
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for table in _meta.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(
                        sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
                    )


def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        max_sandboxes=row.max_sandboxes,
        max_memory_bytes=row.max_memory_bytes,
        max_lifetime_s=row.max_lifetime_s,
        max_disk_bytes=row.max_disk_bytes,
    )


def _sandbox(row: Any) -> SandboxRow:
    policy = row.policy if isinstance(row.policy, dict) else json.loads(row.policy)
    return SandboxRow(
        seq=row.seq,
        id=row.id,
        key_id=row.key_id,
        state=row.state,
        end_reason=row.end_reason,
        end_detail=row.end_detail,
        limit_hit=row.limit_hit,
        policy=policy,
        metadata=dict(row.metadata),
        runtime=row.runtime,
        memory_bytes=row.memory_bytes,
        disk_bytes=row.disk_bytes,
        retained_bytes=row.retained_bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        idle_timeout_s=row.idle_timeout_s,
        ended_at=row.ended_at,
        retain_until=row.retain_until,
        purged=bool(row.purged),
        instance=row.instance,
    )
