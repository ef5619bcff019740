"""Shared fixtures: the real starter model on CPU, offline, with a registry and settings of the tests' own."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_REGISTRY = ROOT / "tests" / "registry.toml"

# A user's own set-up never changes a test's outcome: no DREAMLOOM_* variable, Discord token or dreamloom.toml of
# theirs reaches the tests (or the `dreamloom` processes they start), and every registry is the tests' own.
for _name in [name for name in os.environ if name.startswith("DREAMLOOM_")] + ["DISCORD_TOKEN"]:
    os.environ.pop(_name, None)
os.environ["DREAMLOOM_CONFIG"] = str(ROOT / "tests" / "settings.toml")  # empty on purpose
os.environ["DREAMLOOM_REGISTRY"] = str(TEST_REGISTRY)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from engine.params import parse_prompt
from engine.registry import load_registry


@pytest.fixture(scope="session")
def registry():
    """The tests' registry: the committed starter kit (the same entries `models.toml` ships)."""
    return load_registry(TEST_REGISTRY)


@pytest.fixture(scope="session")
def engine(registry, tmp_path_factory):
    """One CPU engine for the whole session (the starter model loads once)."""
    from engine.service import Engine

    instance = Engine(registry, tmp_path_factory.mktemp("cache"), device="cpu")
    yield instance
    instance.close()


def pixels(image) -> np.ndarray:
    """An image as a float array in 0..255."""
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference (0..255) of two same-size images."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def prompt(text: str, **kwargs):
    """parse_prompt with a short default for CPU tests."""
    return parse_prompt(text, **kwargs)


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server; skipped with a reason where it cannot start, but never in CI."""
    from tests.pg_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
    except Exception as error:  # noqa: BLE001 - any failure to start is reported the same way
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL must run in CI: {error}")
        pytest.skip(f"PostgreSQL tests skipped: {error}")
    yield server
    server.stop()


_database_counter = iter(range(10**6))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'dreamloom.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"test_{next(_database_counter)}_{os.getpid()}")


_exit_status = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """A thread that never returned must not hang the run at exit (Python joins its threads there): name it with
    its stack and leave with the tests' own exit status."""
    import sys
    import threading
    import traceback

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in others:
        thread.join(timeout=5)
    stuck = [t for t in others if t.is_alive()]
    if not stuck:
        return
    frames = sys._current_frames()
    for thread in stuck:
        print(f"\nthread {thread.name} never returned:", file=sys.stderr)
        if thread.ident in frames:
            traceback.print_stack(frames[thread.ident], file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status["code"] or 1)
