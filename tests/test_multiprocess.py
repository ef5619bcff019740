"""The multi-machine shape on one machine, on PostgreSQL: one `serve --no-worker` (the Discord bot, against the
Discord double, and the web gallery) and two `dreamloom worker` processes. Thirty jobs from six members; one worker is
killed with SIGKILL in the middle of a job; every job completes exactly once, with its own four pictures, and the
progress the workers report (steps with previews, the end) reaches the front door's web event stream and its
Discord message edits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select

from storage import workers as heartbeats
from storage.database import Database
from storage.models import Image, Job
from tests.aio import run
from tests.discord_double import ADMIN, DiscordDouble, Member
from tests.test_containers import _free_port

DREAMLOOM = Path(sys.executable).parent / "dreamloom"
MEMBERS = 6
JOBS_EACH = 5
QUICK = "--steps 4"


async def _spawn(env: dict, *args: str, log: Path) -> asyncio.subprocess.Process:
    handle = log.open("wb")
    return await asyncio.create_subprocess_exec(str(DREAMLOOM), *args, env=env, stdout=handle, stderr=handle,
                                                start_new_session=True)


async def _stop(process: asyncio.subprocess.Process | None) -> None:
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 60)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()


async def _read_events(session: aiohttp.ClientSession, url: str) -> list[dict]:
    """Every event of a job's web stream, until the stream ends (the job ended)."""
    events = []
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=300)) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return events


def _front_door_maps_torch(pid: int) -> bool:
    """Whether a process has torch's shared library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.timeout(900)
def test_a_front_door_and_two_workers_on_postgres_survive_a_killed_worker(postgres_server, tmp_path):
    url = postgres_server.create_database("multiprocess")

    async def scenario():
        double = DiscordDouble()
        await double.start()
        port = _free_port()
        env = {**os.environ, "DREAMLOOM_DATABASE_URL": url, "DREAMLOOM_DATA_DIR": str(tmp_path / "data"),
               "DREAMLOOM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "DREAMLOOM_LEASE_SECONDS": "5",
               "DISCORD_TOKEN": "test-token", "DREAMLOOM_DISCORD_API_BASE": double.api_base,
               "DREAMLOOM_DISCORD_GATEWAY_URL": double.gateway_url, "DREAMLOOM_DISCORD_PROGRESS_INTERVAL_S": "0.05",
               "DREAMLOOM_GALLERY_PORT": "0", "DREAMLOOM_RESULT_CACHE": "false"}
        front_env = env | {"DREAMLOOM_GALLERY_PORT": str(port)}
        worker_env = env | {"DISCORD_TOKEN": "", "DREAMLOOM_TORCH_THREADS": "1"}
        front = workers = None
        db = Database(url)
        try:
            # 1. The front door: the bot logs in to the double, the gallery answers.
            started = time.monotonic()
            front = await _spawn(front_env, "serve", "--no-worker", log=tmp_path / "front.log")
            await double.connected(120)
            await double.wait_for(lambda: double.commands, 60, "the bot's commands")
            ready_s = time.monotonic() - started
            # The server's owner shows its pictures on the public web gallery (so a visitor may follow a job).
            admin = Member("4999", "owner", permissions=ADMIN)
            made_public = await double.slash(admin, "admin", {"public": True}, subcommand="gallery")
            await double.wait_for(lambda: made_public.callbacks, 60, "the admin reply")
            workers = [await _spawn(worker_env, "worker", log=tmp_path / f"worker{n}.log") for n in (1, 2)]

            # The owner sees both workers in /admin status once they beat (a worker on another machine shows up the
            # same way: all it shares with the front door is the database and the image store).
            async def both_beating() -> bool:
                async with db.session() as session:
                    return len(await heartbeats.alive(session)) == 2

            await double.wait_for(both_beating, 120, "both workers' heartbeats")
            status = await double.slash(admin, "admin", {}, subcommand="status")
            await double.wait_for(lambda: status.callbacks, 60, "/admin status")
            assert "**2 worker(s)** alive" in status.callbacks[0]["data"]["content"], status.callbacks

            # 2. Thirty jobs from six members, all at once, as a busy evening would bring them.
            members = [Member(str(4001 + n), f"member{n}") for n in range(MEMBERS)]
            handles = []
            for round_ in range(JOBS_EACH):
                for n, member in enumerate(members):
                    prompt = f"a {('red', 'green', 'blue', 'yellow', 'purple')[round_]} circle number {n} --seed {n * 10 + round_} {QUICK}"
                    handles.append(await double.slash(member, "imagine", {"prompt": prompt}))

            async def job_ids() -> list[int]:
                async with db.session() as session:
                    return list((await session.scalars(select(Job.id).order_by(Job.id))).all())

            ids = await double.wait_for(lambda: _enough(job_ids, MEMBERS * JOBS_EACH), 120, "thirty queued jobs")

            # 3. The web event stream of a job that has not started yet, followed from the front door.
            async with aiohttp.ClientSession() as web:
                streamed = asyncio.create_task(_read_events(web, f"http://127.0.0.1:{port}/jobs/{ids[-1]}/events"))

                # 4. SIGKILL one worker while it runs a job.
                victim = workers[0]

                async def running_on_victim() -> int | None:
                    async with db.session() as session:
                        owners = (await session.execute(select(Job.id, Job.lease_owner).where(Job.status == "running"))).all()
                    return next((job_id for job_id, owner in owners if owner and f":{victim.pid}:" in owner), None)

                killed_job = await double.wait_for(running_on_victim, 300, "a job running on the first worker")
                await asyncio.sleep(0.5)  # in the middle of its steps
                os.killpg(victim.pid, signal.SIGKILL)
                await victim.wait()

                # 5. Every job ends, done, with its four pictures: the killed one is taken again after its lease.
                async def all_done() -> bool:
                    async with db.session() as session:
                        statuses = (await session.scalars(select(Job.status))).all()
                    return all(status == "done" for status in statuses)

                await double.wait_for(all_done, 600, "every job done")
                events = await asyncio.wait_for(streamed, 60)
            async with db.session() as session:
                images = (await session.execute(select(Image.job_id, func.count(), func.count(func.distinct(Image.path)))
                                                .group_by(Image.job_id))).all()
                killed = await session.get(Job, killed_job)
                owners = set((await session.scalars(select(Job.lease_owner))).all())
            assert sorted(job_id for job_id, _, _ in images) == ids
            assert all(count == 4 and paths == 4 for _, count, paths in images), images  # never doubled
            assert killed.attempts == 2 and killed.status == "done"
            assert owners == {None}  # every lease released
            async with db.session() as session:
                paths = (await session.scalars(select(Image.path))).all()
            assert len(paths) == len(set(paths)) == MEMBERS * JOBS_EACH * 4

            # 6. The web stream saw the steps with previews and the end, from a worker process.
            steps = [e for e in events if e["kind"] == "step"]
            assert steps and any(e["preview"] for e in steps), events
            assert events[-1]["kind"] == "done", events

            # 7. Every member's Discord message went through progress edits with a preview to the final grid.
            for handle in handles:
                message = await double.wait_for(lambda: _final(double, handle), 60, "the final grid")
                assert message["attachments"] and message["components"], message
            progress = [r for r in double.requests if r.method == "PATCH" and r.files
                        and "step" in (r.json or {}).get("content", "")]
            assert len({r.path for r in progress}) >= MEMBERS * JOBS_EACH // 2, "progress edits with previews"

            # 8. The front door never loaded torch, and started quickly.
            assert not _front_door_maps_torch(front.pid)
            print(json.dumps({"front_door_ready_s": round(ready_s, 2)}))
        finally:
            for process in (workers or []):
                await _stop(process)
            await _stop(front)
            await db.close()
            await double.stop()
        for name in ("front.log", "worker1.log", "worker2.log"):
            log = (tmp_path / name).read_text(errors="replace")
            assert "Traceback" not in log or name == "worker1.log", log[-4000:]

    run(scenario(), timeout=900)


async def _enough(job_ids, count: int):
    ids = await job_ids()
    return ids if len(ids) >= count else None


def _final(double: DiscordDouble, handle) -> dict | None:
    message = double.original(handle)
    return message if message and message["components"] else None
