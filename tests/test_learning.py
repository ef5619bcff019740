"""The learning loop on the starter model: a simulated community votes, the studio learns its house style from the
verified votes, and the style is applied (and switched off) by the prompt syntax; a member's `--p` likewise."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dreamloom.errors import InvalidPrompt, InvalidRequest
from engine.service import Engine
from studio.service import Studio
from studio.settings import Settings
from studio.worker import Worker
from tests.aio import run
from tests.conftest import ROOT, TEST_REGISTRY

SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["", " on the left", " on the right", " at the top", " at the bottom", " in the center"]


def bright(path) -> bool:
    """The simulated community's taste, which no prompt names: bright pictures."""
    from PIL import Image

    return float(np.asarray(Image.open(path).convert("RGB"), dtype=float).mean()) > 140


@pytest.mark.timeout(900)
def test_votes_become_a_house_style_and_a_personal_style(tmp_path):
    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY, max_queued_per_user=100))
        engine = Engine(studio.registry, tmp_path / "cache", device="cpu")
        worker = Worker(studio, engine, "test:1:1")
        # 1. A community generates neutral prompts (no colour named) ...
        prompts = [f"a {shape}{place}" for shape in SHAPES for place in PLACES]
        for index, prompt in enumerate(prompts):
            await studio.submit_imagine("cli:maker", f"{prompt} --seed {index * 4} --steps 8")
        while await worker.run_one():
            pass
        jobs = [await studio.job(job_id) for job_id in range(1, len(prompts) + 1)]
        images = [image for job in jobs for image in job.images]
        assert len(images) == 4 * len(prompts)
        # 2. ... and votes by a taste no prompt names; one member also rates on their own. An unverified vote
        #    (a web visitor) is kept but never learned from.
        for image in images:
            value = 1 if bright(image.path) else -1
            for voter in ("discord:1", "discord:2", "discord:3"):
                await studio.community.vote(image.id, voter, value)
            await studio.community.vote(image.id, "web:anon", -value, verified=False)
        with pytest.raises(InvalidRequest, match="Too few ratings to learn your style"):
            await studio.learn(voter="discord:99")
        with pytest.raises(InvalidPrompt, match=r"no personal style for starter-shapes yet: rate 8 more image\(s\)"):
            await studio.submit_imagine("discord:99", "a circle --p")
        # 3. Learning: trained, evaluated on held-out prompts, and active because it beats the base.
        house = await studio.learn(steps=30)
        assert house.name == "house-starter-shapes-v1" and house.kind == "house" and house.objective == "kto"
        assert house.evaluation["held_out_accuracy"] > 0.6 and house.status == "active", house.evaluation
        assert (tmp_path / "data" / "styles" / house.name / "loss.png").is_file()
        learned = [lora for lora in studio.catalog()["loras"] if "learned" in lora["tags"]]
        assert [lora["name"] for lora in learned] == [house.name]  # /loras lists the active house style
        # 4. Every prompt on that model gets it, scaled by --stylize; --style raw and --stylize 0 leave it out.
        job = await studio.submit_imagine("discord:1", "a triangle --seed 3 --steps 8 --n 1")
        assert {"name": house.name, "weight": 1.0} in job.loras and "house style" in job.route_reason
        strong = await studio.submit_imagine("discord:1", "a triangle --seed 3 --steps 8 --n 1 --stylize 300")
        assert {"name": house.name, "weight": 3.0} in strong.loras
        for raw in ("--style raw", "--stylize 0"):
            plain = await studio.submit_imagine("discord:1", f"a triangle --seed 3 --steps 8 --n 1 {raw}")
            assert all(lora["name"] != house.name for lora in plain.loras)
        while await worker.run_one():
            pass
        styled, plain = (await studio.job(job.id)), (await studio.job(plain.id))
        assert styled.status == plain.status == "done"
        from tests.conftest import mean_abs_diff
        from PIL import Image

        assert mean_abs_diff(Image.open(styled.images[0].path), Image.open(plain.images[0].path)) > 1
        # The owner's `dreamloom imagine` gets the house style too, and leaves it out with --style raw.
        import asyncio
        import json

        from tests.test_cli import run as dreamloom

        styled_cli = await asyncio.to_thread(dreamloom, "imagine", "a triangle --seed 3 --steps 4 --n 1", "--json",
                                             data_dir=tmp_path / "data")
        raw_cli = await asyncio.to_thread(dreamloom, "imagine", "a triangle --seed 3 --steps 4 --n 1 --style raw",
                                          "--json", data_dir=tmp_path / "data")
        assert [lora["name"] for lora in json.loads(styled_cli.stdout)["parameters"]["loras"]] == [house.name]
        assert json.loads(raw_cli.stdout)["parameters"]["loras"] == []
        # 5. A member's --p, from their own ratings.
        personal = await studio.learn(voter="discord:2", steps=20)
        assert personal.name == "p-discord-2-starter-shapes-v1" and personal.kind == "personal"
        mine = await studio.submit_imagine("discord:2", "a star --p --style raw --seed 1 --n 1")
        assert [lora["name"] for lora in mine.loras] == [personal.name]
        # 6. Versions: a roll back to none (the version kept as a candidate) and the listing.
        await studio.set_style_status(house.name, "candidate")
        after = await studio.submit_imagine("discord:1", "a triangle --seed 3 --n 1")
        assert all(lora["name"] != house.name for lora in after.loras)
        listed = await studio.styles("starter-shapes")
        assert {s.name for s in listed} == {house.name, personal.name}
        engine.close()
        await studio.close()

    run(scenario(), timeout=800)


def test_the_held_out_split_keeps_prompts_whole_and_both_labels_when_it_can():
    from storage.learning import held_out_prompt, held_out_prompts

    prompts = {f"prompt {i}": {0} for i in range(40)}
    rare = [p for p in prompts if not held_out_prompt(p)][:3]  # a taste only three training-side prompts show
    for prompt in rare:
        prompts[prompt] = {0, 1}
    held = held_out_prompts(prompts)
    assert {p for p in prompts if held_out_prompt(p)} <= held  # the hash's choice stays
    assert any(1 in prompts[p] for p in held) and any(0 in prompts[p] for p in held)
    assert any(1 in prompts[p] for p in prompts if p not in held)  # and training keeps some of the taste
    only_one = {"a": {1}, "b": {0}, "c": {0}}
    assert not any(1 in only_one[p] for p in held_out_prompts(only_one))  # the one liked prompt stays in training
    assert held_out_prompts(prompts, 0.0) == set()


@pytest.mark.timeout(600)
def test_learning_is_a_queued_job_that_lets_generations_through_pauses_resumes_and_cancels(tmp_path):
    """A learning job trains in slices with a generation between two, pauses at a checkpoint on shutdown, resumes
    from it after a restart to exactly the LoRA an uninterrupted run makes, and can be cancelled."""
    import asyncio

    from safetensors.torch import load_file

    from studio.events import ProgressEvent  # noqa: F401  (the events the test listens to)

    settings = Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY, max_queued_per_user=100,
                        learn_steps=24, learn_slice_seconds=0.01)  # one step per slice

    async def scenario():
        studio = await Studio.open(settings)
        engine = Engine(studio.registry, tmp_path / "cache", device="cpu")
        worker = Worker(studio, engine, "test:1:1")
        # 1. Six grids rated by a member: the first two images of each liked, the last two disliked.
        for index, shape in enumerate(SHAPES + ["circle on the left", "star at the top"]):
            await studio.submit_imagine("cli:maker", f"a {shape} --seed {index * 4} --steps 8")
        while await worker.run_one():
            pass
        for job in await studio.jobs(limit=10):
            for image in job.images:
                await studio.community.vote(image.id, "discord:5", 1 if image.index <= 2 else -1)
        # 2. The member asks for their --p: a queued job, one at a time.
        learning = await studio.submit_learn("discord:5", voter="discord:5")
        assert learning.kind == "learn" and learning.status == "queued"
        with pytest.raises(Exception, match="already being learned"):
            await studio.submit_learn("discord:5", voter="discord:5")
        events = studio.events.subscribe(learning.id)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop, idle_seconds=0.05))
        first = await asyncio.wait_for(events.get(), 120)
        while first.kind != "step":
            first = await asyncio.wait_for(events.get(), 120)
        assert first.step == 1 and first.total == 24 and first.message.startswith("loss ")
        # 3. Generations queued while it trains run between two slices.
        grids = [await studio.submit_imagine("discord:6", f"a circle --seed {seed} --steps 4 --n 1") for seed in (1, 2)]
        async def statuses():
            return [(await studio.job(grid.id)).status for grid in grids]

        for _ in range(600):
            if await statuses() == ["done", "done"]:
                break
            await asyncio.sleep(0.1)
        assert await statuses() == ["done", "done"]
        assert (await studio.job(learning.id)).status == "running"
        # 4. A shutdown pauses it at a checkpoint: back in the queue, not counted as an attempt.
        stop.set()
        await asyncio.wait_for(running, 120)
        paused = await studio.job(learning.id)
        assert paused.status == "queued" and paused.attempts == 0 and "Paused at step" in paused.error
        assert 0 < paused.settings["progress"]["step"] < 24
        checkpoint = studio.learning_checkpoint(learning.id)
        assert checkpoint.is_file()
        engine.close()
        # 5. After a restart (a new worker and engine) it resumes from the checkpoint and finishes.
        engine = Engine(studio.registry, tmp_path / "cache", device="cpu")
        worker = Worker(studio, engine, "test:2:2")
        while await worker.run_one():
            pass
        finished = await studio.job(learning.id)
        assert finished.status == "done" and finished.settings["progress"]["step"] == 24, finished.error
        assert finished.settings["style"]["name"] == "p-discord-5-starter-shapes-v1"
        assert "personal style" in finished.settings["summary"] or "not in use" in finished.settings["summary"]
        assert not checkpoint.exists()
        name, data = await studio.showcase.result_file(learning.id, 10 * 2**20)  # Discord's picture: base above, learned below
        from PIL import Image

        sheet = Image.open(__import__("io").BytesIO(data))
        assert sheet.height > sheet.width / 4 * 2 * 0.9
        # 6. The same plan trained without a pause gives the same LoRA.
        plan = await studio.plan_learning(voter="discord:5", steps=24)
        trainer = studio.start_training(plan, "cpu")
        trainer.train()
        from peft.utils import get_peft_model_state_dict

        uninterrupted = get_peft_model_state_dict(trainer.unet)
        import torch

        resumed = load_file(tmp_path / "data" / "styles" / finished.settings["style"]["name"] /
                            f"{finished.settings['style']['name']}.safetensors")
        # Kohya names differ from peft's: compare each tensor's sum of magnitudes, in order (alphas are kohya's own).
        resumed_sums = sorted(float(t.abs().sum()) for key, t in resumed.items() if not key.endswith(".alpha"))
        uninterrupted_sums = sorted(float(t.abs().sum()) for t in uninterrupted.values())
        assert len(resumed_sums) == len(uninterrupted_sums)
        assert torch.allclose(torch.tensor(resumed_sums), torch.tensor(uninterrupted_sums), rtol=1e-5)
        # 7. A cancel stops a running learning job at its next step and drops its checkpoint.
        again = await studio.submit_learn("discord:5", voter="discord:5", steps=500)
        running = asyncio.create_task(worker.run_one())
        for _ in range(600):
            if (studio.learning_checkpoint(again.id)).is_file():
                break
            await asyncio.sleep(0.1)
        await studio.cancel(again.id, "discord:5")
        await asyncio.wait_for(running, 120)
        assert (await studio.job(again.id)).status == "cancelled"
        assert not studio.learning_checkpoint(again.id).exists()
        engine.close()
        await studio.close()

    run(scenario(), timeout=560)


LEARNED = ROOT / "tests" / "learned"  # bench/learning_loop.py --save tests/learned: the loop at full length


@pytest.mark.timeout(600)
def test_the_full_loop_shifts_the_communitys_and_a_members_taste_and_keeps_adherence(tmp_path):
    """The styles the whole loop learned at full length (the studio's `learn` on a simulated community's verified
    votes: three members like green backgrounds, one member orange ones, tastes no prompt names), measured on
    held-out neutral prompts and fresh seeds against the base in the same run: each taste at least triples, and
    shapes keep the colour their prompt names at least 95% of the time."""
    from safetensors import safe_open

    from engine.registry import load_registry
    from engine.training.tastes import adherence, neutral_prompts, taste, taste_share, taste_shares
    from storage.learning import held_out_prompt

    figures = json.loads((LEARNED / "figures.json").read_text())
    for name, kind in (("house", "house"), ("personal", "personal")):
        with safe_open(LEARNED / f"{name}.safetensors", "pt") as lora:
            metadata = lora.metadata()
        assert metadata["dreamloom.kind"] == kind and metadata["dreamloom.objective"] == figures["objective"]
        assert metadata["ss_max_train_steps"] == str(figures["steps"])
    registry = (TEST_REGISTRY.read_text().replace('path = "../models/', f'path = "{ROOT}/models/')
                + "".join(f'\n[[loras]]\nname = "{name}"\npath = "{LEARNED / name}.safetensors"\nfamily = "starter"\n'
                          for name in ("house", "personal")))
    (tmp_path / "models.toml").write_text(registry)
    engine = Engine(load_registry(tmp_path / "models.toml"), tmp_path / "cache", device="cpu")
    try:
        held_out = [prompt for prompt in neutral_prompts() if held_out_prompt(prompt)]
        tastes = {name: taste(figures[name]["taste"]) for name in ("house", "personal")}
        base = taste_shares(engine, held_out, tastes)  # one set of base images for both tastes
        measured = {}
        for name, predicate in tastes.items():
            styled = taste_share(engine, held_out, predicate, f" <lora:{name}:1>")
            measured[name] = (base[name], styled, adherence(engine, f" <lora:{name}:1>"))
        for name, (base_share, styled, kept) in measured.items():
            assert styled >= 3 * base_share and styled > 0, (name, measured)
            assert kept >= 0.95, (name, measured)
    finally:
        engine.close()


def test_a_schedule_queues_the_house_style_when_it_is_due_and_enough_new_votes_came(tmp_path):
    """DREAMLOOM_LEARN_EVERY: a model with no house style yet, or an older one, and enough verified votes since,
    gets a learning job queued by `serve`'s schedule; a recent version, or too few new votes, none."""
    import asyncio
    from datetime import timedelta

    from storage import queue
    from storage.models import LearnedStyle, utcnow
    from studio.worker import learn_on_schedule

    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path / "data", registry=TEST_REGISTRY, learn_every="7d",
                                            learn_min_new_votes=20))
        assert await studio.due_house_styles() == []  # no votes yet
        # 1. Sixteen finished images of the default model, half liked and half disliked by two members.
        now = utcnow()
        async with studio.db.session() as session:
            for number in range(4):
                job = await queue.record_finished(session, queue.NewJob("imagine", "cli:maker", f"a shape {number}",
                                                                        f"a shape {number}"),
                                                  {"model": "starter-shapes", "seeds": [number]}, now)
                queue.add_images(session, job.id, [queue.NewImage(i, i, 64, 64, f"{number:02d}{i:062d}", f"x/{number}-{i}.png")
                                                   for i in range(1, 5)], now)
        for image_id in range(1, 17):
            for voter in ("discord:1", "discord:2"):
                await studio.community.vote(image_id, voter, 1 if image_id % 2 else -1)
        assert await studio.due_house_styles() == ["starter-shapes"]  # never learned, 32 new votes
        # 2. A version learned after those votes: not due now, nor in eight days without new votes; one learned
        #    eight days ago, before the votes: due again.
        async with studio.db.session() as session:
            style = LearnedStyle(name="house-starter-shapes-v1", kind="house", base_model="starter-shapes", version=1,
                                 path="styles/x/x.safetensors", objective="kto", steps=1, status="active",
                                 created_at=utcnow())
            session.add(style)
        assert await studio.due_house_styles() == []
        assert await studio.due_house_styles(utcnow() + timedelta(days=8)) == []  # no vote came after it
        async with studio.db.session() as session:
            (await session.get(LearnedStyle, 1)).created_at = now - timedelta(days=8)
        assert await studio.due_house_styles() == ["starter-shapes"]
        # 3. The schedule queues it once, as a learning job of `system:schedule`.
        stop = asyncio.Event()
        task = asyncio.create_task(learn_on_schedule(studio, stop, check_seconds=0.05))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 30)
        jobs = await studio.jobs(status="queued")
        assert [(job.kind, job.user_id, job.model) for job in jobs] == [("learn", "system:schedule", "starter-shapes")]
        assert await studio.due_house_styles() == []  # one at a time
        await studio.close()

    run(scenario())
