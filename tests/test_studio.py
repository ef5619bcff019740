"""Storage and the studio on real SQLite and PostgreSQL: queue, fairness, votes, export, migrations."""
from __future__ import annotations

import asyncio
import io
import json
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image as PILImage
import sqlalchemy as sa
from sqlalchemy import func, inspect, select, update

from dreamloom.errors import InvalidPrompt, InvalidRequest, LimitReached, NotAllowed, NotFound, UnknownModel
from storage import queue
from storage.database import Database
from storage.export import ExportFilter, KohyaLayout
from storage.gallery import GalleryQuery
from storage.models import Image, Job, JobLora, User, utcnow
from studio.service import Studio
from studio.settings import Settings
from tests.conftest import TEST_REGISTRY
from tests.aio import run


async def open_studio(database_url: str, tmp_path: Path, **overrides) -> Studio:
    settings = Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY, database_url=database_url, **overrides)
    return await Studio.open(settings)


async def finish(studio: Studio, job_id: int, worker: str = "test-worker", count: int = 4) -> list[int]:
    """Claim-free completion of a specific job with small real PNG files (no engine)."""
    from PIL import Image as PILImage
    import io

    images = []
    for index in range(1, count + 1):
        buffer = io.BytesIO()
        PILImage.new("RGB", (8, 8), (job_id * 10 % 255, index * 40, 0)).save(buffer, format="PNG")
        stored = studio.store.put(buffer.getvalue())
        images.append(queue.NewImage(index, 100 + index, 8, 8, stored.sha256, stored.path))
    async with studio.db.session() as session:
        job = await session.get(Job, job_id)
        if job.status == "queued":
            (await session.get(queue.User, job.user_id)).queued_count -= 1
        job.status, job.lease_owner = "running", worker
        parent = job.parent_image_id
        images = [queue.NewImage(i.index_in_job, i.seed, 8, 8, i.sha256, i.path, parent) for i in images]
        assert await queue.complete(session, job_id, worker, images, {"model": job.model, "seeds": [101]})
    async with studio.db.session() as session:
        return list((await session.scalars(select(Image.id).where(Image.job_id == job_id).order_by(Image.id))).all())


def test_migrations_from_empty_to_head_and_back(database_url):
    async def scenario():
        db = Database(database_url)
        assert await db.revision() is None
        await db.upgrade()
        assert await db.revision() == Database.head() == "0011"
        async with db.engine.connect() as connection:
            tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            job_columns = await connection.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("jobs")})
        assert {"jobs", "images", "votes", "users", "guilds", "favourites", "job_loras", "learned_styles",
                "route_examples", "workers", "job_previews"} <= tables
        assert {"result_key", "cached_from_job_id", "affinity_skips"} <= job_columns
        await db.downgrade("base")
        assert await db.revision() is None
        await db.upgrade()
        assert await db.revision() == Database.head()
        await db.close()

    run(scenario())


def test_migration_0004_lists_the_loras_of_existing_jobs(database_url):
    async def scenario():
        db = Database(database_url)
        await db.upgrade("0003")
        # The jobs table as it was at 0003 (today's model has columns added since).
        old_jobs = sa.table("jobs", *(sa.column(name) for name in (
            "kind", "status", "priority", "user_id", "raw_prompt", "prompt", "negative_prompt", "attempts",
            "max_attempts", "cancel_requested")), sa.column("parameters", sa.JSON()), sa.column("loras", sa.JSON()),
            sa.column("created_at", sa.DateTime(timezone=True)))
        common = {"kind": "imagine", "status": "queued", "priority": 0, "user_id": "alice", "prompt": "",
                  "negative_prompt": "", "attempts": 0, "max_attempts": 3, "cancel_requested": False, "parameters": {},
                  "created_at": datetime.now(timezone.utc)}
        async with db.session() as session:
            session.add(User(id="alice", display_name="alice", defaults={}))
            await session.flush()
            for raw, loras in (("a", [{"name": "outline", "weight": 1.0}, {"name": "night", "weight": 0.5}]),
                               ("b", []), ("c", [{"name": "night", "weight": 1.0}])):
                await session.execute(sa.insert(old_jobs).values(raw_prompt=raw, loras=loras, **common))
        await db.upgrade()
        async with db.session() as session:
            rows = (await session.execute(select(JobLora.job_id, JobLora.name).order_by(JobLora.job_id, JobLora.name))).all()
        assert [tuple(row) for row in rows] == [(1, "night"), (1, "outline"), (3, "night")]
        await db.close()

    run(scenario())


def test_gallery_by_lora_lists_its_images_and_their_upscales(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        with_outline = await studio.submit_imagine("alice", "a red circle --lora outline --seed 1")
        plain = await studio.submit_imagine("bob", "a blue star --seed 2")
        with_both = await studio.submit_imagine("carol", "a green square <lora:night:0.7> --lora outline:0.5")
        both_images = await finish(studio, with_both.id)
        outline_images = await finish(studio, with_outline.id) + both_images
        await finish(studio, plain.id)
        upscale = await studio.submit_from_image("dave", outline_images[0], "upscale", "detail")
        outline_images += await finish(studio, upscale.id, count=1)  # an upscale keeps its source's LoRAs

        async def listed(**filters):
            items, _ = await studio.showcase.gallery(GalleryQuery(period="all", per_page=100, **filters))
            return sorted(item.image_id for item in items)

        assert await listed(lora="outline") == sorted(outline_images)
        assert await listed(lora="night") == both_images
        assert await listed(lora="nobody-uses-this") == []
        assert await listed(lora="outline", user_id="carol") == both_images
        await studio.close()

    run(scenario())


def test_fairness_a_big_queue_does_not_starve_a_small_one(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=100)
        for i in range(50):
            await studio.submit_imagine("alice", f"a red circle --seed {i}")
        bob = await studio.submit_imagine("bob", "a blue star")
        assert bob.position == 2  # alice's oldest job starts first (she comes first by name), then bob's
        upscale_source = (await finish(studio, 1))[0]
        upscale = await studio.submit_from_image("carol", upscale_source, "upscale", "detail")
        claimed = []
        async with studio.db.session() as session:
            for _ in range(4):
                claimed.append((await queue.claim(session, "w1", 30)).id)
        assert claimed[0] == upscale.id  # upscales first: they are short
        assert bob.id in claimed[1:3]  # then round-robin: bob does not wait behind alice's 49 jobs
        await studio.close()

    run(scenario())


def test_claims_are_exclusive_under_concurrency(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=100)
        for user in range(6):
            for i in range(5):
                await studio.submit_imagine(f"user{user}", f"a red circle --seed {i}")

        async def worker(name):
            got = []
            while True:
                async with studio.db.session() as session:
                    job = await queue.claim(session, name, 30, lock=not studio.db.is_sqlite)
                if job is None:
                    return got
                got.append(job.id)

        results = await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
        everything = [job for got in results for job in got]
        assert sorted(everything) == list(range(1, 31))  # every job once, none twice
        async with studio.db.session() as session:
            counts = (await session.execute(select(func.sum(queue.User.queued_count)))).scalar()
        assert counts == 0
        await studio.close()

    run(scenario())


def test_completion_is_idempotent_and_orphans_are_requeued(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        job = await studio.submit_imagine("alice", "a red circle --seed 1")
        async with studio.db.session() as session:
            claimed = await queue.claim(session, "host-a:1:1", 30)
        assert claimed.id == job.id and claimed.attempts == 1
        # The worker dies; a new worker on the same host requeues the job.
        async with studio.db.session() as session:
            assert await queue.requeue_orphans(session, owner_prefix="host-a:") == [job.id]
        async with studio.db.session() as session:
            again = await queue.claim(session, "host-a:2:2", 30)
            assert again.id == job.id and again.attempts == 2
            image = queue.NewImage(1, 1, 8, 8, "0" * 64, "00/00/x.png")
            assert await queue.complete(session, job.id, "host-a:2:2", [image], {"seeds": [1]})
        async with studio.db.session() as session:
            # A late completion (the old worker, or the same one twice) changes nothing.
            assert not await queue.complete(session, job.id, "host-a:1:1", [image], {"seeds": [1]})
            assert not await queue.complete(session, job.id, "host-a:2:2", [image], {"seeds": [1]})
        view = await studio.job(job.id)
        assert view.status == "done" and len(view.images) == 1
        await studio.close()

    run(scenario())


def test_a_job_that_keeps_crashing_fails_after_max_attempts(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_attempts=2)
        job = await studio.submit_imagine("alice", "a red circle")
        for attempt in range(2):
            async with studio.db.session() as session:
                assert (await queue.claim(session, f"h:{attempt}:0", 30)).id == job.id
            async with studio.db.session() as session:
                await queue.requeue_orphans(session, owner_prefix="h:")
        view = await studio.job(job.id)
        assert view.status == "failed" and "2 attempts" in view.error
        await studio.close()

    run(scenario())


def test_upgrade_from_the_previous_revision_keeps_data_and_backfills_counts(database_url, tmp_path):
    async def scenario():
        from sqlalchemy import text

        db = Database(database_url)
        await db.upgrade("0001")
        async with db.session() as session:
            for statement in (
                "INSERT INTO users (id, display_name, defaults, banned, queued_count, created_at) "
                "VALUES ('u1', 'u1', '{}', false, 0, CURRENT_TIMESTAMP), ('u2', 'u2', '{}', false, 0, CURRENT_TIMESTAMP), "
                "('web:5f2c', '', '{}', false, 0, CURRENT_TIMESTAMP)",
                "INSERT INTO jobs (id, kind, status, priority, user_id, raw_prompt, prompt, negative_prompt, parameters, "
                "loras, attempts, max_attempts, cancel_requested, created_at) VALUES (1, 'imagine', 'done', 0, 'u1', "
                "'a cat', 'a cat', '', '{}', '[]', 1, 3, false, CURRENT_TIMESTAMP)",
                "INSERT INTO images (id, job_id, index_in_job, seed, width, height, sha256, path, created_at) "
                "VALUES (1, 1, 1, 5, 64, 64, 'abc', 'ab/c.png', CURRENT_TIMESTAMP)",
                "INSERT INTO votes (user_id, image_id, value, source, created_at) VALUES "
                "('u1', 1, 1, 'cli', CURRENT_TIMESTAMP), ('u2', 1, 1, 'cli', CURRENT_TIMESTAMP), "
                "('web:5f2c', 1, -1, 'web', CURRENT_TIMESTAMP)",  # a cookie anyone could choose: kept, not counted
            ):
                await session.execute(text(statement))
        await db.upgrade()
        assert await db.revision() == Database.head()
        async with db.session() as session:
            image = await session.get(Image, 1)
            assert (image.up_votes, image.down_votes) == (2, 0) and image.score > 0.3
            assert (await session.get(Job, 1)).raw_prompt == "a cat"
        await db.close()

    run(scenario())


def test_concurrent_votes_give_exact_counts(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        job = await studio.submit_imagine("alice", "a red circle")
        image_id = (await finish(studio, job.id))[0]
        voters = [f"user{i}" for i in range(60)]
        await asyncio.gather(*(studio.community.vote(image_id, user, 1 if i % 3 else -1, "reaction") for i, user in enumerate(voters)))
        # Everyone votes again (no doubles), a third flip to up, ten remove their vote.
        await asyncio.gather(*(studio.community.vote(image_id, user, 1 if i % 3 else -1, "button") for i, user in enumerate(voters)))
        await asyncio.gather(*(studio.community.vote(image_id, user, 1, "web") for user in voters[:30:3]))
        await asyncio.gather(*(studio.community.unvote(image_id, user) for user in voters[50:]))
        up, down = await studio.community.vote(image_id, "late", 1, "cli")
        async with studio.db.session() as session:
            image = await session.get(Image, image_id)
            assert (image.up_votes, image.down_votes) == (up, down)  # the denormalised counts agree
        expected_down = sum(1 for i in range(50) if i % 3 == 0 and i >= 30)
        expected_up = sum(1 for i in range(50) if i % 3 or i < 30) + 1
        assert (up, down) == (expected_up, expected_down)
        await studio.close()

    run(scenario())


def test_limits_bans_and_bad_input(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=2, daily_quota=3)
        first = await studio.submit_imagine("alice", "a red circle")
        second = await studio.submit_imagine("alice", "a red circle")
        with pytest.raises(LimitReached, match="2 jobs queued"):
            await studio.submit_imagine("alice", "a red circle")
        await finish(studio, first.id)
        third = await studio.submit_imagine("alice", "a red circle")
        await finish(studio, second.id)
        with pytest.raises(LimitReached, match="daily quota of 3"):
            await studio.submit_imagine("alice", "a red circle")
        await studio.cancel(third.id, "alice")  # a cancelled job never ran: it gives its quota back
        await studio.submit_imagine("alice", "a red circle")
        with pytest.raises(NotAllowed, match="not yours"):
            await studio.cancel(first.id, "mallory")
        with pytest.raises(InvalidPrompt, match="--chaos"):
            await studio.submit_imagine("bob", "a cat --chaos 500")
        with pytest.raises(UnknownModel, match="Unknown model"):
            await studio.submit_imagine("bob", "a cat --model nope")
        with pytest.raises(NotFound, match="no image 999"):
            await studio.community.vote(999, "bob", 1)
        with pytest.raises(NotFound, match="no job 999"):
            await studio.job(999)
        image_id = (await studio.job(first.id)).images[0].id
        with pytest.raises(InvalidRequest, match="got 7"):
            await studio.community.vote(image_id, "bob", 7)
        with pytest.raises(InvalidRequest, match="is a file"):
            await studio.export(Path("/etc/hostname"), "imagefolder", ExportFilter())
        with pytest.raises(InvalidRequest, match="format must be one of"):
            await studio.export(tmp_path / "out", "zip", ExportFilter())
        async with studio.db.session() as session:
            (await queue.ensure_user(session, "eve")).banned = True
        with pytest.raises(NotAllowed, match="banned"):
            await studio.submit_imagine("eve", "a cat")
        assert (await studio.job(first.id)).status == "done"  # nothing stored was lost on the way
        await studio.close()

    run(scenario())


def test_export_formats_filters_and_lineage(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=20)
        grid = await studio.submit_imagine("alice", "a red circle on a blue background --seed 1")
        images = await finish(studio, grid.id)
        for value, voters in ((1, 3), (-1, 2)):
            for v in range(voters):
                await studio.community.vote(images[0] if value > 0 else images[1], f"voter{v}", value)
        await studio.community.vote(images[2], "voter0", 1)
        upscale = await studio.submit_from_image("bob", images[0], "upscale", "detail")
        upscaled = await finish(studio, upscale.id, count=1)
        lineage = await studio.showcase.lineage(images[0])
        assert [d["image_id"] for d in lineage["descendants"]] == upscaled
        assert (await studio.showcase.lineage(upscaled[0]))["ancestors"] == [{"image_id": images[0], "job_id": grid.id}]

        report = await studio.export(tmp_path / "hf", "imagefolder", ExportFilter(min_score=1))
        rows = [json.loads(line) for line in (tmp_path / "hf" / "metadata.jsonl").read_text().splitlines()]
        assert report.images == 2 and [r["score"] for r in rows] == [3, 1]
        assert rows[0]["text"] == "a red circle on a blue background" and (tmp_path / "hf" / rows[0]["file_name"]).is_file()
        await studio.export(tmp_path / "kohya", "kohya", ExportFilter(min_score=1), KohyaLayout("circlestyle", "art", 5))
        captions = sorted((tmp_path / "kohya" / "5_circlestyle art").glob("*.caption"))
        assert len(captions) == 2 and captions[0].read_text().strip() == "circlestyle, a red circle on a blue background"
        assert all(c.with_suffix(".png").is_file() for c in captions)
        config = tomllib.loads((tmp_path / "kohya" / "dataset.toml").read_text())
        assert config["general"]["caption_extension"] == ".caption"
        assert config["datasets"][0]["subsets"][0] == {"image_dir": "5_circlestyle art", "num_repeats": 5,
                                                       "class_tokens": "circlestyle art"}
        with pytest.raises(InvalidRequest, match="Trigger and class words"):
            await studio.export(tmp_path / "bad", "kohya", ExportFilter(), KohyaLayout("../up", "art"))
        # The dpo export loads with Hugging Face `datasets` as diffusers' Diffusion-DPO script loads it (its default
        # split is `validation`) and has the columns the script reads.
        dpo = await studio.export(tmp_path / "dpo", "dpo", ExportFilter())
        from datasets import load_dataset

        rows = load_dataset(str(tmp_path / "dpo"), split="validation")
        assert dpo.pairs == len(rows) > 0 and {"caption", "jpg_0", "jpg_1", "label_0"} <= set(rows.column_names)
        for row in rows:
            assert row["caption"] == "a red circle on a blue background"
            first, second = (PILImage.open(io.BytesIO(row[column])).convert("RGB") for column in ("jpg_0", "jpg_1"))
            assert first.size == second.size == (8, 8) and first != second
            preferred = row["score_0"] > row["score_1"]
            assert row["label_0"] == (1.0 if preferred else 0.0)
        assert {row["label_0"] for row in rows} == {0.0, 1.0}
        pairs_report = await studio.export(tmp_path / "pairs", "pairs", ExportFilter())
        pairs = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
        assert pairs_report.pairs == len(pairs) > 0
        assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        assert all((tmp_path / "pairs" / p["chosen"]).is_file() for p in pairs)
        with pytest.raises(InvalidRequest, match="not empty"):
            await studio.export(tmp_path / "hf", "imagefolder", ExportFilter())
        none = await studio.export(tmp_path / "none", "imagefolder", ExportFilter(model="other-model"))
        assert none.images == 0
        outlined = await studio.submit_imagine("carol", "a green square --lora outline --seed 4")
        outlined_images = await finish(studio, outlined.id)
        await studio.community.vote(outlined_images[1], "voter0", 1)
        by_lora = await studio.export(tmp_path / "lora", "imagefolder", ExportFilter(lora="outline", min_score=1))
        rows = [json.loads(line) for line in (tmp_path / "lora" / "metadata.jsonl").read_text().splitlines()]
        assert by_lora.images == 1 and rows[0]["image_id"] == outlined_images[1]
        assert [lora["name"] for lora in rows[0]["loras"]] == ["outline"]
        await studio.close()

    run(scenario())


def test_user_defaults_apply_where_the_prompt_is_silent(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        await studio.community.set_user_defaults("alice", {"ar": "16:9", "stylize": 250, "tile": True})
        plain = await studio.submit_imagine("alice", "a red circle")
        assert plain.parameters["aspect_ratio"] == "16:9" and plain.parameters["stylize"] == 250 and plain.parameters["tile"]
        explicit = await studio.submit_imagine("alice", "a red circle --ar 1:1 --s 50")
        assert explicit.parameters["aspect_ratio"] == "1:1" and explicit.parameters["stylize"] == 50
        other = await studio.submit_imagine("bob", "a red circle")
        assert other.parameters["aspect_ratio"] == "1:1"
        with pytest.raises(InvalidPrompt, match="--chaos"):
            await studio.community.set_user_defaults("alice", {"chaos": 500})
        with pytest.raises(InvalidRequest, match="Unknown default"):
            await studio.community.set_user_defaults("alice", {"colour": "red"})
        await studio.close()

    run(scenario())


def test_times_come_back_as_utc(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        job = await studio.submit_imagine("alice", "a red circle")
        again = await studio.job(job.id)
        assert again.created_at.tzinfo is not None and again.created_at.utcoffset().total_seconds() == 0
        await studio.close()

    run(scenario())


def test_nothing_is_queued_that_would_be_dropped_silently(tmp_path):
    async def scenario():
        studio = await open_studio(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
        with pytest.raises(InvalidPrompt, match="--iw weighs an image prompt"):
            await studio.submit_imagine("alice", "a cat --iw 2")
        with pytest.raises(InvalidPrompt, match="Unknown parameters --fast, --hd"):
            await studio.submit_imagine("alice", "a cat --fast --hd --ar 3:2")
        assert await studio.jobs() == []
        await studio.close()

    run(scenario())


def test_cancelling_a_caller_mid_query_never_hangs_nor_holds_the_lock(tmp_path):
    """A front door's task cancelled in the middle of a studio call (a bot closing, a shutdown) stops at once, and the
    database stays writable. A task cancelled inside a SQLAlchemy session on aiosqlite used to hang for ever (SQLAlchemy
    2.1 closes the connection under asyncio.shield, and aiosqlite's close never completes there), and with it
    asyncio.run's clean-up: the bot suite's hang."""
    import random
    import sqlite3

    async def scenario():
        path = tmp_path / "db.sqlite"
        studio = await open_studio(f"sqlite+aiosqlite:///{path}", tmp_path)
        job = await studio.submit_imagine("alice", "a red circle")
        rng = random.Random(5)
        for _ in range(60):
            async def poll():
                while True:
                    await studio.job(job.id)
            task = asyncio.create_task(poll())
            await asyncio.sleep(rng.uniform(0.001, 0.02))
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, "a cancelled caller did not stop"
        from storage.database import settle

        await settle()  # the last unit of work finishes on its own (on a busy machine, after a while)
        other = sqlite3.connect(path, timeout=5)  # another process writes: no lock was left behind
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
        assert (await studio.job(job.id)).status == "queued"
        await studio.close()

    run(scenario())


def test_only_verified_votes_count_and_a_ban_can_purge_votes(database_url, tmp_path):
    """Anonymous web votes are kept apart (ranking, starboard, export never see them); a banned member's votes can
    be removed with the counts recomputed; one member votes at most `max_votes_per_minute` times a minute."""
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_votes_per_minute=3)
        grid = await studio.submit_imagine("discord:1", "a red circle --seed 1")
        images = await finish(studio, grid.id)
        await studio.community.vote(images[0], "discord:2", 1, source="reaction")
        await studio.community.vote(images[0], "discord:3", 1, source="web")
        for anonymous in range(10):
            assert await studio.community.vote(images[1], f"web:{anonymous:04x}", 1, source="web", verified=False) == (0, 0)
        assert await studio.community.vote(images[1], "discord:2", -1, source="button") == (0, 1)
        (first, _), = [(item.image_id, item.up) for item in (await studio.showcase.gallery(GalleryQuery(period="all")))[0][:1]]
        assert first == images[0]  # 10 anonymous up-votes did not lift image 2
        report = await studio.export(tmp_path / "before", "imagefolder", ExportFilter(min_score=1))
        assert report.images == 1
        # A script on a real account: the fourth vote in a minute is refused (429 on the web).
        more = await finish(studio, (await studio.submit_imagine("discord:1", "a blue square --seed 2")).id)
        for image_id in more:
            try:
                await studio.community.vote(image_id, "discord:9", 1, source="reaction")
            except LimitReached as error:
                assert error.retry_after == 60 and "in the last minute" in str(error)
                break
        else:
            raise AssertionError("the vote cap never applied")
        # The admin bans discord:2 and removes their votes: counts and export follow.
        removed = await studio.set_banned("discord:2", True, purge_votes=True)
        assert removed == 2
        assert (await studio.showcase.image_detail(images[0]))["up"] == 1 and (await studio.showcase.image_detail(images[1]))["down"] == 0
        with pytest.raises(NotAllowed, match="banned"):
            await studio.community.vote(images[0], "discord:2", 1, source="reaction")
        rows = [json.loads(line) for line in (tmp_path / "before" / "metadata.jsonl").read_text().splitlines()]
        assert rows[0]["score"] == 2
        await studio.export(tmp_path / "after", "imagefolder", ExportFilter(min_score=1))
        rows = [json.loads(line) for line in (tmp_path / "after" / "metadata.jsonl").read_text().splitlines()]
        assert {row["image_id"]: row["score"] for row in rows}[images[0]] == 1
        await studio.close()

    run(scenario())


def test_members_name_models_the_owner_may_give_paths(database_url, tmp_path):
    from tests.conftest import ROOT

    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        folder = str(ROOT / "models" / "starter-shapes")
        messages = set()
        for path in (folder, "/etc", "/root/x.safetensors", "~nosuchuser", "/" + "a" * 300, "..\\models"):
            with pytest.raises(UnknownModel) as refused:
                await studio.submit_imagine("discord:1", f"a cat --model {path}")
            messages.add(str(refused.value))
        assert len(messages) == 1 and "/" not in messages.pop()
        with pytest.raises(UnknownModel, match="Unknown model 'nope'"):
            studio.check_prompt("a cat --model nope")
        owned = await studio.submit_imagine("cli:owner", f"a cat --model {folder}", owner=True)
        assert owned.model == folder  # kept as the path: the worker must not look the folder's name up
        assert len(await studio.jobs()) == 1
        await studio.close()

    run(scenario())


def test_sign_in_states_work_once_and_sessions_end(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, discord_client_id="1", discord_client_secret="s",
                                   public_url="https://art.example.org")
        state, url = await studio.sign_in.begin("//evil.example.com/")
        assert url.startswith("https://discord.com/oauth2/authorize?") and "code_challenge_method=S256" in url
        assert "redirect_uri=https%3A%2F%2Fart.example.org%2Fauth%2Fdiscord%2Fcallback" in url
        assert "scope=identify+guilds" in url and f"state={state}" in url
        with pytest.raises(NotAllowed, match="expired or was already used"):
            await studio.sign_in.finish("not-the-state", "code")
        from datetime import timedelta

        from storage import sessions

        async with studio.db.session() as session:
            pending = await sessions.take_sign_in(session, state)
            assert pending.return_to == "/"  # never an open redirect
            assert await sessions.take_sign_in(session, state) is None  # once
        for hostile in ("/\t/evil.example.com", "/\\evil.example.com", "https://evil.example.com/"):
            state, _ = await studio.sign_in.begin(hostile)
            async with studio.db.session() as session:
                assert (await sessions.take_sign_in(session, state)).return_to == "/", hostile
        async with studio.db.session() as session:
            token, _ = await sessions.create_session(session, "discord:5", verified=True, guild_ids=["g"],
                                                     lifetime=timedelta(days=1))
        member = await studio.sign_in.member(token)
        assert member.user_id == "discord:5" and member.verified and member.guild_ids == ("g",)
        assert await studio.sign_in.member(token + "x") is None
        await studio.set_banned("discord:5", True)  # a ban signs the member out
        assert await studio.sign_in.member(token) is None
        with pytest.raises(NotAllowed, match="Sign in with Discord"):
            await studio.sign_in.anonymous_visitor()  # not allowed unless an admin says so
        await studio.close()

    run(scenario())


def test_anonymous_visitors_where_an_admin_allows_them_are_kept_apart(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, web_allow_anonymous=True)
        grid = await studio.submit_imagine("discord:1", "a red circle --seed 1")
        image = (await finish(studio, grid.id))[0]
        token, visitor = await studio.sign_in.anonymous_visitor()
        assert visitor.user_id.startswith("web:") and not visitor.verified and visitor.csrf_token
        assert (await studio.sign_in.member(token)).user_id == visitor.user_id
        assert await studio.community.vote(image, visitor.user_id, 1, source="web", verified=visitor.verified) == (0, 0)
        assert await studio.community.vote_of(image, visitor.user_id) == 1  # kept, and shown to them
        assert (await studio.showcase.image_detail(image))["up"] == 0  # but not counted
        await studio.close()

    run(scenario())


def test_sign_in_with_discord_admits_only_the_configured_servers_members(tmp_path):
    """The whole OAuth2 flow against the Discord double over HTTP: consent, code, PKCE-checked token, account and
    servers; a member of another server only is refused, and a code works once."""
    import re
    from urllib.parse import parse_qs, urlparse

    import aiohttp

    from tests.discord_double import DiscordDouble, Member

    async def scenario():
        double = DiscordDouble()
        await double.start()
        double.add_account(Member("5001", "insider"))
        double.add_account(Member("5002", "outsider"), ["999"])
        public = "http://gallery.test"
        double.redirect_uris.append(public + "/auth/discord/callback")
        studio = await open_studio(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path,
                                   discord_client_id=double.client_id, discord_client_secret=double.client_secret,
                                   discord_api_base=double.api_base, discord_oauth_url=double.oauth_url,
                                   public_url=public, signin_guild_ids=[double.guild_id])

        async def approve(user_id: str, return_to: str = "/") -> tuple[str, str]:
            state, url = await studio.sign_in.begin(return_to)
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as consent:
                    page = await consent.text()
                fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
                async with http.post(url.split("?")[0], data={**fields, "user_id": user_id},
                                     allow_redirects=False) as answer:
                    back = urlparse(answer.headers["Location"])
            assert back.netloc == "gallery.test" and parse_qs(back.query)["state"] == [state]
            return state, parse_qs(back.query)["code"][0]

        state, code = await approve("5001", "/image/3")
        token, return_to = await studio.sign_in.finish(state, code)
        member = await studio.sign_in.member(token)
        assert (member.user_id, member.display_name, return_to) == ("discord:5001", "insider", "/image/3")
        assert double.token_requests[-1]["code_verifier"] and "client_secret" not in double.token_requests[-1]
        with pytest.raises(NotAllowed, match="expired or was already used"):
            await studio.sign_in.finish(state, code)  # replayed
        state, code = await approve("5002")
        with pytest.raises(NotAllowed, match="Only members of this community"):
            await studio.sign_in.finish(state, code)
        state, _ = await approve("5001")
        with pytest.raises(NotAllowed, match="did not accept"):
            await studio.sign_in.finish(state, "a-forged-code")
        await studio.close()
        await double.stop()

    run(scenario())


def test_model_affinity_prefers_a_loaded_model_but_passes_the_fair_job_over_at_most_three_times(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=100)
        for i in range(4):
            await studio.submit_imagine("alice", f"a red circle --seed {i} --model starter-shapes")
            await studio.submit_imagine("bob", f"a blue star --seed {i} --model starter-niji")

        async def order(loaded: tuple[str, ...]) -> list[str]:
            models = []
            async with studio.db.session() as session:
                for _ in range(4):
                    models.append((await queue.claim(session, "w1", 30, loaded_models=loaded)).model)
            async with studio.db.session() as session:  # everything back in the queue, for the next policy
                await session.execute(update(Job).values(status="queued", affinity_skips=0, lease_owner=None))
                await session.execute(update(User).values(last_served_at=None, queued_count=4))
            return models

        # Without affinity: strict round-robin. A worker holding the niji model takes bob's niji jobs first, but
        # alice's job (the fair next one) waits behind at most three of them.
        assert await order(()) == ["starter-shapes", "starter-niji"] * 2
        assert await order(("starter-niji",)) == ["starter-niji"] * 3 + ["starter-shapes"]
        # Holding alice's model: her job first (it is the fair one), then bob's passed over three times, the bound.
        assert await order(("starter-shapes",)) == ["starter-shapes"] * 4
        await studio.close()

    run(scenario())


def test_a_new_members_first_submissions_at_the_same_moment_all_queue_within_the_limit(database_url, tmp_path):
    # Two front doors (or a burst of slash commands) see a member for the first time at once: the user row is
    # created once, no submission fails on it, and the queue limit still holds.
    async def scenario():
        studio = await open_studio(database_url, tmp_path, max_queued_per_user=4)
        results = await asyncio.gather(*(studio.submit_imagine("newcomer", f"a red circle --seed {n}")
                                         for n in range(6)), return_exceptions=True)
        queued = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(queued) == 4 and all(isinstance(r, LimitReached) for r in refused), results
        async with studio.db.session() as session:
            user = await session.get(User, "newcomer")
            assert user.queued_count == 4
        await studio.close()

    run(scenario())


def test_an_expired_lease_is_queued_again_by_the_next_claim(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        job = await studio.submit_imagine("alice", "a red circle --seed 1")
        async with studio.db.session() as session:
            assert (await queue.claim(session, "gone:1:1", 30)).id == job.id
        later = utcnow() + timedelta(seconds=31)  # the claiming worker died without renewing
        async with studio.db.session() as session:
            assert await queue.requeue_orphans(session, now=later, lock=not studio.db.is_sqlite) == [job.id]
            assert await queue.requeue_orphans(session, now=later) == []  # never twice
            again = await queue.claim(session, "alive:2:2", 30)
        assert again.id == job.id and again.attempts == 2
        await studio.close()

    run(scenario())
