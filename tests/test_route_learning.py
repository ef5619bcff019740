"""The router learns from use: members' explicit choices that others up-voted become examples on their server
(bounded, decaying, removable), on real SQLite and PostgreSQL, with the real sentence-embedding model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import update

from storage.models import RouteExampleRow, utcnow
from tests.aio import run
from tests.conftest import ROOT, TEST_REGISTRY
from tests.test_studio import finish, open_studio

GUILD, OTHER_GUILD = "111", "222"
# The static examples send these to the default model; three members' explicit --niji choices teach the server.
CHOSEN = ["a cozy slice of life scene in a bakery", "slice of life, friends walking home from school",
          "a slice of life moment at a cafe"]
NEW_PROMPT = "slice of life scene at a flower shop"


async def _choose_and_like(studio, text: str, author: str, voter: str, guild: str = GUILD, verified: bool = True):
    job = await studio.submit_imagine(author, text, guild_id=guild)
    images = await finish(studio, job.id)
    await studio.community.vote(images[0], voter, 1, source="reaction", verified=verified)
    return job


def test_explicit_choices_that_others_like_become_a_servers_examples(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path)
        try:
            assert studio.route(NEW_PROMPT, guild_id=GUILD).model == "starter-shapes"
            # The author's own up-vote and an unverified visitor's do not teach the router.
            await _choose_and_like(studio, f"{CHOSEN[0]} --niji", "discord:1", "discord:1")
            await _choose_and_like(studio, f"{CHOSEN[1]} --niji", "discord:1", "web:ab12", verified=False)
            assert await studio.route_examples(GUILD) == []
            # Another verified member's up-vote does; every explicit choice of the prompt is learned.
            for index, text in enumerate(CHOSEN):
                await _choose_and_like(studio, f"{text} --niji", f"discord:{index + 1}", "discord:9")
            await _choose_and_like(studio, "a bauhaus poster of a fox <lora:outline>", "discord:4", "discord:9")
            learned = await studio.route_examples(GUILD)
            assert sorted((e["text"], e["target"]) for e in learned) == sorted(
                [(t, "starter-niji") for t in CHOSEN] + [("a bauhaus poster of a fox", "outline")])
            assert all(e["weight"] == 1.0 and e["up_votes"] == 1 for e in learned)
            assert {e["chosen_by"] for e in learned} == {"discord:1", "discord:2", "discord:3", "discord:4"}

            decision = studio.route(NEW_PROMPT, guild_id=GUILD)
            assert decision.model == "starter-niji", decision.reasons
            assert "learned #" in json.dumps(decision.explanation["scores"]["starter-niji"]["nearest"])
            assert studio.route(NEW_PROMPT, guild_id=OTHER_GUILD).model == "starter-shapes"  # per server
            assert studio.route("a red circle on a blue background", guild_id=GUILD).model == "starter-shapes"
            # A queued job routes with its server's examples, and says so.
            job = await studio.submit_imagine("discord:5", NEW_PROMPT, guild_id=GUILD)
            assert job.model == "starter-niji" and "like its examples" in job.route_reason

            # Old examples weigh less, and past a quarter they stop counting.
            async with studio.db.session() as session:
                await session.execute(update(RouteExampleRow).values(learned_at=utcnow() - timedelta(days=365)))
            await studio.refresh_route_examples(GUILD)
            assert {e["weight"] for e in await studio.route_examples(GUILD)} == {0.06}
            assert studio.route(NEW_PROMPT, guild_id=GUILD).model == "starter-shapes"
            # A new up-vote learns the prompt again at full weight.
            async with studio.db.session() as session:
                await session.execute(update(RouteExampleRow).values(learned_at=utcnow()))
            await studio.refresh_route_examples(GUILD)
            assert studio.route(NEW_PROMPT, guild_id=GUILD).model == "starter-niji"

            # Removable: one by id, or a target's.
            outline_id = next(e["id"] for e in learned if e["target"] == "outline")
            assert await studio.forget_route_examples(ids=[outline_id], guild_id=OTHER_GUILD) == 0  # another server's admin
            assert await studio.forget_route_examples(ids=[outline_id], guild_id=GUILD) == 1
            assert await studio.forget_route_examples(guild_id=GUILD, target="starter-niji") == 3
            assert await studio.route_examples(GUILD) == []
            assert studio.route(NEW_PROMPT, guild_id=GUILD).model == "starter-shapes"
        finally:
            await studio.close()

    run(scenario())


def test_a_servers_examples_are_bounded_and_only_members_own_prompts_teach(database_url, tmp_path):
    async def scenario():
        studio = await open_studio(database_url, tmp_path, route_examples_max=2, route_learn_min_upvotes=2)
        try:
            job = await _choose_and_like(studio, "a castle in the clouds --niji", "discord:1", "discord:2")
            assert await studio.route_examples(GUILD) == []  # one up-vote of the two this server asks for
            for index, text in enumerate(["a castle in the clouds", "a dragon over a lake", "a fox in the snow"]):
                job = await studio.submit_imagine("discord:1", f"{text} --niji", guild_id=GUILD)
                ids = await finish(studio, job.id)
                await studio.community.vote(ids[0], "discord:2", 1, source="reaction")
                await studio.community.vote(ids[1], "discord:3", 1, source="reaction")
            kept = await studio.route_examples(GUILD)
            assert sorted(e["text"] for e in kept) == ["a dragon over a lake", "a fox in the snow"]  # the oldest went
            # A model from the member's /settings defaults is not a choice made for this prompt.
            await studio.community.set_user_defaults("discord:7", {"model": "starter-niji"})
            job = await studio.submit_imagine("discord:7", "a quiet harbour", guild_id=OTHER_GUILD)
            assert job.model == "starter-niji"
            ids = await finish(studio, job.id)
            await studio.community.vote(ids[0], "discord:2", 1, source="reaction")
            await studio.community.vote(ids[0], "discord:3", 1, source="reaction")
            assert await studio.route_examples(OTHER_GUILD) == []
            # Down-votes teach nothing.
            job = await studio.submit_imagine("discord:1", "a quiet harbour --niji", guild_id=OTHER_GUILD)
            ids = await finish(studio, job.id)
            await studio.community.vote(ids[0], "discord:2", -1, source="reaction")
            await studio.community.vote(ids[0], "discord:3", -1, source="reaction")
            assert await studio.route_examples(OTHER_GUILD) == []
        finally:
            await studio.close()

    run(scenario())


def test_route_explain_and_forgetting_from_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMLOOM_")}
    env.update(DREAMLOOM_DATA_DIR=str(tmp_path / "data"), DREAMLOOM_REGISTRY=str(TEST_REGISTRY), HF_HUB_OFFLINE="1")

    def dreamloom(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    explained = dreamloom("route", "a kawaii bunny at midnight", "--explain")
    assert explained.returncode == 0, explained.stderr
    text = explained.stdout
    assert "model: starter-niji" in text and "LoRAs: night:1.0" in text
    assert "scores (mean similarity of the 3 nearest examples" in text and "[models.toml]" in text
    assert "outline: margin" in text and "needs +0.06" in text
    as_json = json.loads(dreamloom("route", "studio ghibli style countryside", "--explain", "--json").stdout)
    assert as_json["model"] == "starter-niji"
    assert as_json["explanation"]["models"]["starter-niji"]["margin"] >= as_json["explanation"]["model_margin"]
    assert "no learned routing examples yet" in dreamloom("route-examples").stdout
