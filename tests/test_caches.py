"""The result cache (an identical request is answered from the image store, without the GPU) and the prompt-embedding
cache (the text encoder runs once per prompt), on the real starter model and a real database."""
from __future__ import annotations

import time

from engine.generation import ImagineRequest
from engine.service import Engine
from studio.service import Studio
from studio.showcase import GalleryQuery
from studio.settings import Settings
from studio.worker import Worker
from tests.aio import run
from tests.conftest import TEST_REGISTRY, pixels, prompt

PROMPT = "a red circle on a blue background --seed 11 --n 2 --steps 4"


def test_an_identical_request_is_answered_from_the_store_and_any_change_misses(engine, database_url, tmp_path):
    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY,
                                            database_url=database_url))
        worker = Worker(studio, engine, "test:1:1")
        first = await studio.submit_imagine("alice", PROMPT)
        assert first.status == "queued" and await worker.run_one()
        made = await studio.job(first.id)

        # 1. The same request, from another member: done at once, the same files, recorded as a hit.
        started = time.perf_counter()
        again = await studio.submit_imagine("bob", PROMPT)
        elapsed = time.perf_counter() - started
        assert again.status == "done" and again.cached_from_job_id == first.id, again
        assert [i.path for i in again.images] == [i.path for i in made.images]
        assert [i.id for i in again.images] != [i.id for i in made.images]  # its own rows: votes stay per job
        assert again.settings["cache_hit"] == first.id and again.settings["seeds"] == made.settings["seeds"]
        assert not await worker.run_one(), "a cache hit must not reach the GPU queue"
        assert elapsed < 5, elapsed  # generous on a loaded CI machine; the benchmark measures it
        # The community gallery shows each picture once (the job that made it); bob's own page keeps his copies.
        shown, _ = await studio.showcase.gallery(GalleryQuery(period="all", per_page=50).check())
        assert sorted(item.image_id for item in shown) == sorted(image.id for image in made.images)
        bobs, _ = await studio.showcase.gallery(GalleryQuery(period="all", per_page=50, user_id="bob").check())
        assert sorted(item.image_id for item in bobs) == sorted(image.id for image in again.images)

        # 2. Whatever changes the pictures misses: the seed, a parameter, a LoRA weight.
        for changed in (PROMPT.replace("--seed 11", "--seed 12"), PROMPT + " --cfg 5",
                        PROMPT + " <lora:outline:0.5>", PROMPT.replace("red circle", "red  square")):
            view = await studio.submit_imagine("alice", changed)
            assert view.status == "queued" and view.cached_from_job_id is None, changed
            await studio.cancel(view.id, "alice")

        # 3. An upscale of the same picture twice: the second is a hit.
        upscale = await studio.submit_from_image("carol", made.images[0].id, "upscale", "detail")
        assert await worker.run_one()
        twice = await studio.submit_from_image("dave", made.images[0].id, "upscale", "detail")
        assert twice.status == "done" and twice.cached_from_job_id == upscale.id
        await studio.close()

        # 4. Turned off, the same request runs again.
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY,
                                            database_url=database_url, result_cache=False))
        off = await studio.submit_imagine("erin", PROMPT)
        assert off.status == "queued" and off.cached_from_job_id is None
        await studio.close()

    run(scenario())


def test_a_missing_file_is_not_served_from_the_cache(engine, tmp_path):
    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, registry=TEST_REGISTRY))
        worker = Worker(studio, engine, "test:1:1")
        first = await studio.submit_imagine("alice", PROMPT)
        assert await worker.run_one()
        made = await studio.job(first.id)
        made.images[0].path.unlink()
        again = await studio.submit_imagine("bob", PROMPT)
        assert again.status == "queued" and again.cached_from_job_id is None
        assert await worker.run_one()
        remade = await studio.job(again.id)
        assert remade.status == "done" and all(image.path.is_file() for image in remade.images)
        await studio.close()

    run(scenario())


def test_the_embedding_cache_reuses_prompts_and_changes_no_pixel(registry, tmp_path):
    cached = Engine(registry, tmp_path / "cache", device="cpu", embedding_cache_size=8)
    plain = Engine(registry, tmp_path / "cache", device="cpu", embedding_cache_size=0)
    try:
        for text in ("a green star on a white background --seed 3 --n 1 --steps 4",
                     "a green star on a white background --seed 4 --n 2 --steps 4 --chaos 40",
                     "a green star on a white background --seed 4 --n 2 --steps 4 --no red"):
            a = cached.imagine(ImagineRequest(prompt(text))).images
            b = plain.imagine(ImagineRequest(prompt(text))).images
            assert all(abs(pixels(x) - pixels(y)).max() == 0 for x, y in zip(a, b)), text
        stats = cached.embeddings.stats()
        # The second prompt reuses the first's text (chaos comes after the cache); --no is another negative prompt.
        assert stats["hits"] == 1 and stats["misses"] == 2 and stats["saved_s"] > 0, stats
        assert plain.embeddings.stats()["hits"] == 0
        cached.imagine(ImagineRequest(prompt("a green star on a white background --seed 9 --n 1 --steps 4 "
                                             "<lora:outline:0.7>")))
        assert cached.embeddings.stats()["misses"] == 3  # a LoRA may change the text encoder: another entry
    finally:
        cached.close()
        plain.close()
