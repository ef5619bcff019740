"""The database: SQLite (WAL, busy timeout) under the data directory by default, PostgreSQL by URL."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker, create_async_engine

from dreamloom.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def uninterrupted(method):
    """For async functions that hold database sessions: the work runs in a task of its own, so cancelling the caller
    (a front door closing, a shutdown, a test's teardown) returns at once while the unit of work finishes.

    Why: a task cancelled in the middle of a SQLAlchemy session on aiosqlite never finishes cancelling (SQLAlchemy
    closes the connection under `asyncio.shield`, and aiosqlite's close never completes there; the same deadlock is
    reported against SQLAlchemy 2.x with aiosqlite 0.21 and 0.22). The task hangs, and `asyncio.run`'s clean-up, which
    waits for it, hangs the process.
    """
    @functools.wraps(method)
    async def run_to_the_end(*args, **kwargs):
        task = asyncio.get_running_loop().create_task(method(*args, **kwargs),
                                                      name=f"uninterrupted {method.__qualname__}")
        _IN_FLIGHT.add(task)
        task.add_done_callback(_IN_FLIGHT.discard)
        return await asyncio.shield(task)

    return run_to_the_end


_IN_FLIGHT: set[asyncio.Task] = set()  # units of work whose callers may have stopped waiting


async def settle(timeout: float = 10) -> None:
    """Wait for this event loop's units of work still running after their callers were cancelled (before a close,
    so no clean-up has to cancel one in the middle of a session)."""
    loop = asyncio.get_running_loop()
    pending = [task for task in _IN_FLIGHT if task.get_loop() is loop and not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def dialect_insert(session: AsyncSession, table):
    """An INSERT with the session's dialect's ON CONFLICT support (PostgreSQL or SQLite)."""
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (postgresql_insert if session.bind.dialect.name == "postgresql" else sqlite_insert)(table)


def sqlite_url(data_dir: Path) -> str:
    """The default database: `dreamloom.db` in the data directory."""
    return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / 'dreamloom.db'}"


def alembic_config() -> Config:
    """Alembic configuration pointing at the shipped migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


class Database:
    """An async engine and a session factory; one session per unit of work.

        async with db.session() as session:   # commits on success, rolls back on error
            ...
    """

    def __init__(self, url: str) -> None:
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ConfigError(f"Database URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://; got {url.split(':')[0]}.")
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
            event.listen(self.engine.sync_engine, "begin", _sqlite_on_begin)
        else:
            # Custom plans for every execution: asyncpg prepares statements, and after five runs PostgreSQL may switch
            # to a generic plan that ignores the actual values (a rare LoRA planned like a common one took 96 ms p95
            # instead of a few). Planning costs well under a millisecond here.
            self.engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, connect_args={
                "server_settings": {"plan_cache_mode": "force_custom_plan"}})
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit at the end of the block, roll back on an exception."""
        async with self.sessions() as session:
            async with session.begin():
                yield session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A read-only unit of work. On SQLite it takes no write lock (`session` does, up front), so a frequent poll
        never holds up the writers of this or another process."""
        async with self.engine.connect() as connection:
            await connection.execution_options(dreamloom_read_only=True)
            yield connection

    async def upgrade(self, revision: str = "head") -> None:
        """Apply migrations up to `revision` (all by default)."""
        await self._migrate(lambda config: command.upgrade(config, revision))

    async def downgrade(self, revision: str) -> None:
        """Revert migrations down to `revision` (`base` for an empty database)."""
        await self._migrate(lambda config: command.downgrade(config, revision))

    async def revision(self) -> str | None:
        """The revision the database is at (None when empty)."""
        async with self.engine.connect() as connection:
            return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())

    @staticmethod
    def head() -> str:
        """The newest shipped revision."""
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    async def _migrate(self, run) -> None:
        def in_connection(sync_connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = sync_connection
            run(config)

        try:
            async with self.engine.connect() as connection:
                # SQLite changes a constraint by rebuilding the table; with foreign keys on, dropping a table that
                # others point at breaks them. SQLite's own procedure: keys off outside the transaction, migrate,
                # check every key, keys on again.
                if self.is_sqlite:
                    await connection.run_sync(_sqlite_foreign_keys, False)
                try:
                    async with connection.begin():
                        if not self.is_sqlite:
                            # Front doors and workers starting together: one migrates, the others wait for it and
                            # then find nothing left to do (the lock ends with the transaction).
                            await connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7232640)")
                        await connection.run_sync(in_connection)
                        if self.is_sqlite:
                            broken = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
                            if broken:
                                raise ConfigError(f"A migration left {len(broken)} broken reference(s), e.g. "
                                                  f"{tuple(broken[0])}; nothing was changed.")
                finally:
                    if self.is_sqlite:
                        await connection.run_sync(_sqlite_foreign_keys, True)
        except (OperationalError, DBAPIError, OSError) as error:
            raise ConfigError(f"Cannot open the database ({self.safe_url}): {str(error).splitlines()[0][:200]}") from None

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        if "@" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    async def close(self) -> None:
        """Close every pooled connection (after the units of work still running have finished)."""
        await settle()
        await self.engine.dispose()


def _sqlite_foreign_keys(sync_connection, on: bool) -> None:
    # On the driver's connection, outside any transaction: inside one SQLite ignores the pragma, and a statement
    # through SQLAlchemy would begin one (BEGIN IMMEDIATE, below).
    cursor = sync_connection.connection.dbapi_connection.cursor()
    cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    cursor.close()


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Take over transaction control from the driver so `begin` can take the write lock up front.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_on_begin(connection) -> None:
    # BEGIN IMMEDIATE: a transaction that will write waits for the lock at its start (busy_timeout),
    # instead of failing with "database is locked" when it upgrades from reading to writing. Reads say so.
    if connection.get_execution_options().get("dreamloom_read_only"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
