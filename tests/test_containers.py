"""Front doors and workers as separate processes, and the container files that run them: the Dockerfile passes
hadolint and keeps its promises, compose.yaml has the services, volumes and env each needs, and `/healthz` says
whether the database answers."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from storage.database import Database
from storage.files import ImageStore
from studio.service import Studio
from studio.settings import Settings
from tests.aio import run
from tests.conftest import ROOT, TEST_REGISTRY

DREAMLOOM = Path(sys.executable).parent / "dreamloom"


def test_the_dockerfile_passes_hadolint_and_keeps_its_promises():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert 'ENTRYPOINT ["dreamloom"]' in lines and 'CMD ["serve"]' in lines  # exec form, no `make` as PID 1
    assert "make" not in " ".join(lines).replace("mkdir", "")
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines  # CPU by default, CUDA by build argument
    assert "DREAMLOOM_GALLERY_HOST=0.0.0.0" in text and lines.index("COPY pyproject.toml ./") < lines.index("COPY . /tmp/src")
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/healthz" in text
    assert 'VOLUME ["/data", "/models"]' in lines
    assert "[dev" not in text and "pytest" not in text  # no test extras in the image
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "data", ".git"} <= set(ignored)


def test_compose_runs_postgres_one_front_door_and_gpu_workers():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "frontdoor", "worker"}
    assert set(compose["volumes"]) == {"pgdata", "data", "models"}
    front, worker = services["frontdoor"], services["worker"]
    assert front["command"] == ["serve", "--no-worker"] and worker["command"] == ["worker"]
    for service in (front, worker):
        assert service["environment"]["DREAMLOOM_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert {"data:/data", "models:/models"} <= set(service["volumes"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "DISCORD_TOKEN" in front["environment"] and front["ports"] == ["8765:8765"]
    assert front["environment"]["DREAMLOOM_GALLERY_HOST"] == "0.0.0.0"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and "WORKERS" in str(worker["deploy"]["replicas"])
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_healthz_says_whether_the_database_answers(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from engine.registry import load_registry
    from gallery.app import create_app

    async def status_of(studio) -> tuple[int, dict]:
        async with TestClient(TestServer(create_app(studio))) as client:
            response = await client.get("/healthz")
            return response.status, await response.json()

    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY))
        assert await status_of(studio) == (200, {"status": "ok"})
        await studio.close()
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        unreachable = Studio(Settings(data_dir=tmp_path, registry=TEST_REGISTRY),
                             Database(f"postgresql+asyncpg://dreamloom:secret@127.0.0.1:{port}/none"),
                             ImageStore(tmp_path / "images"), load_registry(TEST_REGISTRY))
        assert await status_of(unreachable) == (503, {"status": "database unreachable"})
        await unreachable.close()

    run(scenario())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(300)
def test_a_front_door_process_and_a_worker_process_share_the_queue(tmp_path):
    port = _free_port()
    env = {**os.environ, "DREAMLOOM_DATA_DIR": str(tmp_path), "DREAMLOOM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "DREAMLOOM_GALLERY_PORT": str(port), "DREAMLOOM_LEASE_SECONDS": "5"}
    front = subprocess.Popen([str(DREAMLOOM), "serve", "--no-worker"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    worker = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert json.loads(response.read()) == {"status": "ok"}
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("the front door never answered /healthz")
        submit = subprocess.run([str(DREAMLOOM), "submit", "a red circle --steps 4 --seed 3", "--user", "alice",
                                 "--json"], env=env, capture_output=True, text=True, timeout=120)
        job = json.loads(submit.stdout)
        time.sleep(2)
        assert _status(env, job["id"]) == "queued"  # a front door alone runs no job
        assert _workers(env) == {"workers": [], "queued": 1, "running": 0}
        worker = subprocess.Popen([str(DREAMLOOM), "worker"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while time.time() < deadline and _status(env, job["id"]) != "done":
            time.sleep(0.5)
        assert _status(env, job["id"]) == "done"
        alive = _workers(env)["workers"]
        assert len(alive) == 1 and alive[0]["device"] == "cpu" and alive[0]["models"] == ["starter-shapes"], alive
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        assert _workers(env)["workers"] == []  # a worker that stops leaves the list at once
    finally:
        outputs = []
        for process in (worker, front):
            if process is not None:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                outputs.append(process.communicate(timeout=60)[0])
    worker_output, front_output = outputs
    assert "front doors only, no worker" in front_output and " started: " not in front_output, front_output
    assert " done: " in worker_output and "dreamloom gallery" not in worker_output, worker_output


def _workers(env: dict) -> dict:
    shown = subprocess.run([str(DREAMLOOM), "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    document = json.loads(shown.stdout)
    return {key: document[key] for key in ("workers", "queued", "running")}


def _status(env: dict, job_id: int) -> str:
    shown = subprocess.run([str(DREAMLOOM), "show", str(job_id), "--json"], env=env, capture_output=True, text=True,
                           timeout=60)
    return json.loads(shown.stdout)["status"]


def test_progress_from_a_worker_of_another_studio_reaches_a_front_doors_subscribers(engine, postgres_server, tmp_path):
    """Two studios on one PostgreSQL database, as a front door and a worker process have: the worker's step events
    (with previews) and its end reach the front door's subscriber through LISTEN/NOTIFY."""
    from studio.worker import Worker

    url = postgres_server.create_database(f"events_{os.getpid()}")

    async def scenario():
        front = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, database_url=url))
        back = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, database_url=url))
        try:
            assert await front.events.listen()
            job = await front.submit_imagine("alice", "a red circle --steps 6 --seed 4")
            heard = front.events.subscribe(job.id)
            assert await Worker(back, engine, "other:1:1").run_one()
            kinds, previews = [], 0
            while True:
                event = await asyncio.wait_for(heard.get(), 30)
                kinds.append((event.kind, event.step))
                previews += event.preview_png is not None
                if event.kind == "done":
                    break
            assert kinds[0] == ("started", 0) and kinds[-1] == ("done", 0), kinds
            assert [step for kind, step in kinds if kind == "step"] == [1, 2, 3, 4, 5, 6], kinds
            assert previews >= 1
        finally:
            await back.close()
            await front.close()

    run(scenario())


def test_metrics_count_jobs_cache_hits_model_loads_and_latency_for_allowed_scrapers(engine, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from gallery.app import create_app
    from studio.worker import Worker

    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY))
        worker = Worker(studio, engine, "test:1:1")
        loads_before = engine.cache.loads
        await studio.submit_imagine("alice", "a red circle --steps 4 --seed 5")
        await studio.submit_imagine("bob", "a blue star --steps 4 --seed 6")
        assert await worker.run_one()
        await studio.submit_imagine("carol", "a red circle --steps 4 --seed 5")  # answered from the result cache
        async with TestClient(TestServer(create_app(studio))) as client:
            response = await client.get("/metrics")
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line and not line.startswith("#")}
        assert lines["dreamloom_queue_depth"] == 1
        assert lines['dreamloom_jobs{kind="imagine",status="done"}'] == 2
        assert lines['dreamloom_jobs{kind="imagine",status="queued"}'] == 1
        assert lines["dreamloom_result_cache_hits_total"] == 1
        assert lines['dreamloom_job_running_seconds_count{kind="imagine"}'] == 1
        assert lines['dreamloom_job_queued_seconds_bucket{kind="imagine",le="+Inf"}'] == 1
        assert lines["dreamloom_model_loads_total"] == engine.cache.loads >= loads_before
        assert "dreamloom_embedding_cache_total" in text and "dreamloom_workers" in text
        await studio.close()
        # A scraper outside the allowed networks finds nothing there.
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY, metrics_networks=["10.9.9.0/24"]))
        async with TestClient(TestServer(create_app(studio))) as client:
            assert (await client.get("/metrics")).status == 404
        await studio.close()

    run(scenario())


@pytest.mark.timeout(300)
def test_the_log_never_shows_the_discord_token_or_the_database_password(postgres_server, tmp_path):
    token, password = "MTAx.secret-bot-token.Zz9", "hunter2-db-password"
    gallery_port = _free_port()
    url = postgres_server.create_database(f"logs_{os.getpid()}").replace("postgres@", f"postgres:{password}@", 1)
    assert password in url  # trust auth on the test server: any password is accepted, and it is in the URL
    env = {**os.environ, "DREAMLOOM_DATA_DIR": str(tmp_path), "DREAMLOOM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "DREAMLOOM_GALLERY_PORT": str(gallery_port), "DREAMLOOM_DATABASE_URL": url, "DISCORD_TOKEN": token,
           # Discord is unreachable: the bot logs its failed connection attempts, which must not carry the token.
           "DREAMLOOM_DISCORD_API_BASE": f"http://127.0.0.1:{_free_port()}/api/v10",
           "DREAMLOOM_DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{_free_port()}/"}
    server = subprocess.Popen([str(DREAMLOOM), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline, healthy = time.time() + 90, False
    while time.time() < deadline and not healthy and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gallery_port}/healthz", timeout=2) as response:
                healthy = response.status == 200
        except OSError:
            time.sleep(0.5)
    assert healthy, "serve must keep running (and the gallery answering) while Discord is unreachable"
    server.send_signal(signal.SIGTERM)
    try:
        output = server.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        server.kill()
        output = server.communicate()[0]
    assert "ready on postgresql+asyncpg://" in output and "Discord is unreachable" in output, output
    assert token not in output and password not in output, output
    submit = subprocess.run([str(DREAMLOOM), "submit", "a red circle", "--user", "alice", "--json"],
                            env={**env, "DREAMLOOM_DATABASE_URL": url.replace(str(postgres_server.port), "1", 1)},
                            capture_output=True, text=True, timeout=120)
    assert submit.returncode != 0 and password not in submit.stdout + submit.stderr  # nor an error about it
