"""The Discord bot through the local Discord API double: the real discord.py client, studio, worker and engine."""
from __future__ import annotations

import asyncio

from tests.bot_world import BotWorld
from tests.aio import run
from tests.conftest import ROOT

QUICK = "--steps 4"




def test_imagine_from_command_to_grid(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            assert {c["name"] for c in double.commands} >= {"imagine", "settings", "models", "loras", "queue", "info",
                                                           "help", "gallery", "admin"}
            handle, message, job = await world.imagine(world.alice, f"a red circle on a blue background --seed 7 {QUICK}")
            assert handle.callbacks[0]["type"] == 5  # deferred first: nothing slow stands before Discord's 3 seconds
            edits = [r for r in double.requests if r.method == "PATCH" and handle.token in r.path]
            assert "queued" in edits[0].json["content"] or "starting" in edits[0].json["content"]
            assert any("step" in (r.json or {}).get("content", "") and r.files for r in edits), "progress with a preview"
            assert job.status == "done" and job.message_id == message["id"]
            grid = world.image_of(double.file_of(message))
            assert grid.size == (128, 128)
            assert "Seed: 7" in grid.info["parameters"]  # the file saved from Discord keeps its parameters
            ids = world.custom_ids(message)
            image_ids = [image.id for image in job.images]
            assert ids == [f"dl:u:{i}" for i in image_ids] + [f"dl:r:{job.id}"] + [f"dl:v:{i}" for i in image_ids]
            assert "seed 7" in message["content"] and "<@3001>" in message["content"]

    run(scenario())


def test_buttons_work_after_a_bot_restart(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            _, grid_message, grid = await world.imagine(world.alice, f"a yellow star on a purple background {QUICK}")
            await world.restart_bot()  # a new client: the buttons must be rebuilt from their custom_id alone
            assert double.identifies == 2
            upscale = await double.click(world.bob, grid_message["id"], f"dl:u:{grid.images[1].id}")
            upscaled_message = await world.finished(upscale)
            upscaled = await world.job_of(upscaled_message["id"])
            assert upscaled.kind == "upscale" and upscaled.parent_image_id == grid.images[1].id
            assert world.image_of(double.file_of(upscaled_message)).size == (128, 128)
            assert world.custom_ids(upscaled_message) == [f"dl:{a}:{upscaled.images[0].id}" for a in ("vs", "vx", "uc")]

            vary = await double.click(world.bob, grid_message["id"], f"dl:v:{grid.images[0].id}")
            varied = await world.job_of((await world.finished(vary))["id"])
            assert varied.kind == "vary" and len(varied.images) == 4
            reroll = await double.click(world.alice, grid_message["id"], f"dl:r:{grid.id}")
            rerolled = await world.job_of((await world.finished(reroll))["id"])
            assert rerolled.kind == "reroll" and rerolled.seed != grid.seed and rerolled.prompt == grid.prompt
            strong = await double.click(world.alice, upscaled_message["id"], f"dl:vx:{upscaled.images[0].id}")
            strong_job = await world.job_of((await world.finished(strong))["id"])
            assert strong_job.kind == "vary" and strong_job.parameters["mode"] == "strong"
            creative = await double.click(world.alice, upscaled_message["id"], f"dl:uc:{upscaled.images[0].id}")
            creative_job = await world.job_of((await world.finished(creative))["id"])
            assert creative_job.parameters["mode"] == "creative"
            assert world.image_of(double.file_of(double.original(creative))).size == (256, 256)

    run(scenario())


def test_reactions_act_and_vote(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double, studio = world.double, world.studio
            _, grid_message, grid = await world.imagine(world.alice, f"a green square on a white background {QUICK}")
            before = set(double.messages)
            await double.react(world.bob, grid_message["id"], "2\ufe0f\u20e3")  # U2 by reaction

            def new_result():
                for message_id in set(double.messages) - before:
                    message = double.messages[message_id]
                    if message["components"]:
                        return message
            upscaled_message = await double.wait_for(new_result, 120, "the upscale posted by reaction")
            upscaled = await world.job_of(upscaled_message["id"])
            assert upscaled.kind == "upscale" and upscaled.parent_image_id == grid.images[1].id
            assert upscaled.user_id == "discord:3002"

            before = set(double.messages)
            await double.react(world.alice, upscaled_message["id"], "\U0001f3a8")  # vary (subtle) by reaction
            varied = await world.job_of((await double.wait_for(new_result, 120, "variations"))["id"])
            assert varied.kind == "vary" and varied.parent_image_id == upscaled.images[0].id
            before = set(double.messages)
            await double.react(world.alice, grid_message["id"], "\U0001f504")  # reroll by reaction
            rerolled = await world.job_of((await double.wait_for(new_result, 120, "reroll"))["id"])
            assert rerolled.kind == "reroll"

            # Votes: a grid vote counts for its images; removing the reaction removes the vote.
            await double.react(world.bob, grid_message["id"], "\U0001f44d")
            await double.wait_for(_votes(studio, grid.id, (1, 0)), 60, "bob's vote")
            await double.react(world.admin, upscaled_message["id"], "\U0001f44e")
            await double.wait_for(_votes(studio, upscaled.id, (0, 1)), 60, "a down vote")
            await double.react(world.bob, grid_message["id"], "\U0001f44d", add=False)
            await double.wait_for(_votes(studio, grid.id, (0, 0)), 60, "the vote removed")
            await double.react(world.bob, upscaled_message["id"], "\u2b50")
            await double.wait_for(_favourite(studio, "discord:3002", upscaled.images[0].id), 60, "a favourite")

            # The starboard: at the server's threshold the image is reposted once to the gallery channel.
            set_gallery = await double.slash(world.admin, "admin", {"channel": ("channel", double.gallery_channel_id),
                                                                    "threshold": 2}, subcommand="gallery")
            await double.wait_for(lambda: set_gallery.callbacks, 60, "the admin reply")
            for member in (world.alice, world.bob, world.admin):
                await double.react(member, upscaled_message["id"], "\U0001f44d")
            starboard = await double.wait_for(lambda: double.channel_messages(double.gallery_channel_id), 60, "a repost")
            await asyncio.sleep(0.5)
            assert len(double.channel_messages(double.gallery_channel_id)) == 1
            assert f"/image/{upscaled.images[0].id}" in starboard[0]["content"] and starboard[0]["attachments"]

            # An admin bans bob and removes his votes: the counts follow at once.
            await double.wait_for(_votes(studio, upscaled.id, (3, 0)), 60, "three up-votes")
            ban = await double.slash(world.admin, "admin", {"member": world.bob, "purge_votes": True}, subcommand="ban")
            await double.wait_for(lambda: ban.callbacks, 60, "the ban")
            assert "1 vote(s) removed" in ban.callbacks[-1]["data"]["content"]
            await double.wait_for(_votes(studio, upscaled.id, (2, 0)), 60, "bob's vote removed")

    run(scenario())


def _votes(studio, job_id, expected):
    async def check():
        job = await studio.job(job_id)
        return all((image.up, image.down) == expected for image in job.images)
    return check


def _favourite(studio, user_id, image_id):
    async def check():
        return image_id in await studio.community.favourites(user_id)
    return check


def test_429_storm_and_a_dropped_gateway_mid_job(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            # Every progress edit is rate limited for a while, and the first delivery attempts hit 5xx too.
            storm = double.fail("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$", 429, times=12, retry_after=0.05)
            handle = await double.slash(world.alice, "imagine", {"prompt": "a blue triangle on an orange background --steps 12"})
            await double.wait_for(lambda: handle.callbacks, 60, "the defer")
            await double.drop_gateway()  # mid-job: the bot resumes and the job is still delivered
            message = await world.finished(handle)
            assert storm.times == 0
            assert double.resumes >= 1 and double.identifies == 1
            job = await world.job_of(message["id"])
            assert job.status == "done" and world.image_of(double.file_of(message)).size == (128, 128)
            rate_limited = [r for r in double.requests if r.status == 429]
            assert len(rate_limited) == 12
            # Progress edits are throttled: far fewer edits than the 12 steps x retries.
            edits = [r for r in double.requests if r.method == "PATCH" and handle.token in r.path and r.status == 200]
            assert len(edits) <= 14

            # After the resume, the gateway still brings commands; a 5xx on the final edit is retried.
            double.fail("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$", 500, times=1)
            _, second, _ = await world.imagine(world.bob, f"a white star on a black background {QUICK}")
            assert second["attachments"]

    run(scenario())


def test_results_after_the_interaction_token_expired_come_as_a_channel_message(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            await world.restart_bot(interaction_lifetime_s=0.3)  # Discord's 15 minutes, shortened
            handle = await double.slash(world.alice, "imagine", {"prompt": "a red square on a green background --steps 20"})
            await double.wait_for(lambda: handle.original_id, 60, "the acknowledgement")

            def delivered():
                return [m for m in double.channel_messages(double.channel_id)
                        if m["components"] and m["id"] != handle.original_id]
            message = (await double.wait_for(delivered, 120, "a channel message with the grid"))[0]
            job = await world.job_of(message)
            assert job.status == "done" and "<@3001>" in message["content"]
            assert any(r.path == f"/channels/{double.channel_id}/messages" and r.method == "POST" for r in double.requests)

    run(scenario())


def _bomb_png() -> bytes:
    import io
    import zlib
    import struct
    # A 30000 x 30000 greyscale PNG of zeros: under 1 MB on disk, 900 MB decoded. Compressed row by row (no 900 MB
    # buffer) and called in a thread: building it takes seconds, and must not stall the bot's event loop.
    width = height = 30000
    compressor, row = zlib.compressobj(9), b"\x00" + bytes(width)
    raw = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    buffer = io.BytesIO()
    buffer.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                 + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return buffer.getvalue()


def test_bad_input_gets_a_clear_private_message(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double, studio = world.double, world.studio

            async def error_for(options, member=None, **kwargs):
                handle = await double.slash(member or world.alice, "imagine", options, **kwargs)
                return await world.error_reply(handle)

            assert "--foo" in await error_for({"prompt": "a cat --foo 3"})
            assert "--ar" in await error_for({"prompt": "a cat --ar 0:9"})
            assert "Unknown model" in await error_for({"prompt": "a cat", "model": "nope"})
            # Members name registered models only: a path is refused with one reply, whatever is on disk there.
            starter_folder = str(ROOT / "models" / "starter-shapes")
            refusals = {await error_for({"prompt": f"a cat --model {path}"})
                        for path in (starter_folder, "/etc", "/root/x.safetensors", "~nosuchuser", "/" + "a" * 300)}
            refusals.add(await error_for({"prompt": "a cat", "model": starter_folder}))
            assert len(refusals) == 1, refusals
            assert "--model takes the name of a registered model" in refusals.pop()
            huge = double.add_attachment(b"x" * 100, "huge.png", size=50 * 2**20)
            assert "50.0 MB" in await error_for({"prompt": "a cat", "image": huge})
            text = double.add_attachment(b"hello", "notes.txt", content_type="text/plain")
            assert "not an image" in await error_for({"prompt": "a cat", "image": text})
            disguised = double.add_attachment(b"not really a png", "cat.png")
            assert "not a readable image" in await error_for({"prompt": "a cat", "image": disguised})
            bomb = double.add_attachment(await asyncio.to_thread(_bomb_png), "bomb.png")
            assert "pixels" in await error_for({"prompt": "a cat", "image": bomb})
            # NSFW-tagged models: refused in ordinary channels, fine in age-restricted ones.
            assert "NSFW" in await error_for({"prompt": "a cat --model after-dark"})
            allowed = await double.slash(world.alice, "imagine", {"prompt": "a red circle --model after-dark --steps 2"},
                                         channel_id=double.nsfw_channel_id)
            await world.finished(allowed)
            # Banned words, named in the refusal.
            words = await double.slash(world.admin, "admin", {"words": "dragon, Lava Lamp"}, subcommand="banned-words")
            await double.wait_for(lambda: words.callbacks, 60, "the admin reply")
            assert "lava lamp" in await error_for({"prompt": "a LAVA LAMP on a table"})
            # Admin commands are checked, not only hidden.
            ban = await double.slash(world.bob, "admin", {"member": world.alice}, subcommand="ban")
            assert "Manage Server" in await world.error_reply(ban)
            assert "after-dark" in (await world.job_of(double.original(allowed)["id"])).model
            # A real ban by an admin stops generation with a message.
            ban = await double.slash(world.admin, "admin", {"member": world.alice}, subcommand="ban")
            await double.wait_for(lambda: ban.callbacks, 60, "the ban")
            assert "banned" in await error_for({"prompt": "a red circle"})
            # Nothing of the refused requests was queued, and the bot still works.
            assert len(await studio.jobs(limit=100)) == 1
            _, message, _ = await world.imagine(world.bob, f"a red circle on a blue background {QUICK}")
            assert message["attachments"]
            # Only ephemeral replies for errors: no public message carries a warning.
            assert not [m for m in double.messages.values() if "\u26a0" in m["content"] and not m["flags"] & 64]

    run(scenario())


def test_member_commands(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double, studio = world.double, world.studio

            async def reply(member, name, options=None, **kwargs):
                handle = await double.slash(member, name, options, **kwargs)
                await double.wait_for(lambda: handle.callbacks, 60, f"/{name}")
                return handle.callbacks[0]["data"]

            settings = await reply(world.alice, "settings", {"ar": "3:2", "chaos": 10})
            assert settings["flags"] & 64 and "--ar 3:2" in settings["content"]
            assert await studio.community.user_defaults("discord:3001") == {"ar": "3:2", "chaos": 10}
            assert "3:2" in (await reply(world.alice, "settings"))["content"]
            assert "ar" not in await studio.community.user_defaults("discord:3002")
            bad = await double.slash(world.alice, "settings", {"ar": "wide"})
            assert "--ar" in await world.error_reply(bad)
            assert "starter-shapes" in (await reply(world.alice, "models"))["content"]
            assert "LoRA" in (await reply(world.alice, "loras"))["content"]
            assert "U1-U4" in (await reply(world.alice, "help"))["content"]
            complete = await double.slash(world.alice, "imagine", {"prompt": "x", "model": "after"}, focused="model")
            await double.wait_for(lambda: complete.token in double.autocomplete, 60, "autocomplete")
            assert [c["value"] for c in double.autocomplete[complete.token]] == ["after-dark"]

            # /queue lists waiting jobs with cancel buttons; another member cannot cancel them.
            world.stop_worker.set()
            await world.worker_task
            job = await studio.submit_imagine("discord:3001", "a red circle --steps 2")
            queue_reply = await reply(world.alice, "queue")
            assert f"Job {job.id}" in queue_reply["content"]
            handle = [h for h in double.interactions.values() if h.callbacks and h.callbacks[0].get("data", {}).get("components")][-1]
            queue_message = double.original(handle)
            assert world.custom_ids(queue_message) == [f"dl:cancel:{job.id}"]
            stranger = await double.click(world.bob, queue_message["id"], f"dl:cancel:{job.id}")
            assert "not yours" in await world.error_reply(stranger)
            owner = await double.click(world.alice, queue_message["id"], f"dl:cancel:{job.id}")
            await double.wait_for(lambda: owner.callbacks, 60, "the cancel")
            assert (await studio.job(job.id)).status == "cancelled"

            # /info shows a finished job's seed, model and lineage; /gallery pages through the server's best.
            world.stop_worker.clear()
            world.worker_task = asyncio.create_task(world.worker.run(world.stop_worker, idle_seconds=0.05))
            _, _, first = await world.imagine(world.alice, f"a red circle on a blue background --seed 3 {QUICK}")
            _, _, second = await world.imagine(world.bob, f"a blue circle on a red background {QUICK}")
            await studio.community.vote(second.images[0].id, "discord:3001", 1)
            info = (await reply(world.bob, "info", {"job": first.id}))["content"]
            assert "Seed: 3" in info and "starter-shapes" in info and f"#{first.images[0].id}" in info
            gallery = await reply(world.alice, "gallery", {"period": "all"})
            assert f"/image/{second.images[0].id}" in gallery["content"]
            gallery_message = double.original([h for h in double.interactions.values()
                                               if h.callbacks and "Gallery" in (h.callbacks[0].get("data") or {}).get("content", "")][-1])
            assert gallery_message["attachments"]
            next_page = await double.click(world.bob, gallery_message["id"], "dl:gal:all:2:")
            await double.wait_for(lambda: next_page.callbacks, 60, "page 2")
            assert next_page.callbacks[0]["type"] == 7
            assert "#2" in double.messages[gallery_message["id"]]["content"]

    run(scenario())


def test_a_prompt_never_pings_anyone(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double = world.double
            _, message, _ = await world.imagine(world.alice, f"@everyone <@&1> <@3002> a red circle {QUICK}")
            assert "@everyone" in message["content"]  # the prompt is shown as written...
            sent = [r for r in double.requests if r.method in ("POST", "PATCH") and isinstance(r.json, dict)
                    and "@everyone" in (r.json.get("content") or "")]
            assert sent
            for request in sent:  # ...and every message that carries it allows no mention at all
                assert request.json.get("allowed_mentions") == {"parse": []}, request.json

    run(scenario())


def test_learning_commands_say_what_they_need(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path, learn_steps=4, learn_slice_seconds=0.01) as world:
            double = world.double
            assert {c["name"] for c in double.commands} >= {"personalize"}
            # /personalize: no style yet, and how many ratings one needs.
            handle = await double.slash(world.alice, "personalize")
            await double.wait_for(lambda: handle.callbacks, 60, "/personalize")
            text = handle.callbacks[0]["data"]["content"]
            assert "No personal style for starter-shapes yet" in text and "rate 8 more image(s) 👍" in text
            # --p without one is answered with that count, privately, and nothing is queued.
            refused = await double.slash(world.alice, "imagine", {"prompt": "a red circle --p"})
            assert "no personal style for starter-shapes yet: rate 8 more" in await world.error_reply(refused)
            started = await double.slash(world.alice, "personalize", {"start": True})
            assert "Too few ratings to learn your style" in await world.error_reply(started)
            # /admin learn and /admin styles: checked like every admin command, and the same sentence with no votes.
            learn = await double.slash(world.admin, "admin", {"steps": 10}, subcommand="learn")
            assert "Too few ratings to learn the community's style for starter-shapes" in await world.error_reply(learn)
            styles = await double.slash(world.admin, "admin", {}, subcommand="styles")
            await double.wait_for(lambda: styles.callbacks, 60, "/admin styles")
            assert "No house style learned yet" in styles.callbacks[0]["data"]["content"]
            stranger = await double.slash(world.bob, "admin", {"steps": 10}, subcommand="learn")
            assert "Manage Server" in await world.error_reply(stranger)
            assert len(await world.studio.jobs(limit=10)) == 0
            # With enough of her own ratings, /personalize start queues a learning job; its message shows the
            # progress, then what was learned and the base above the style below.
            for index, shape in enumerate(["circle", "square", "triangle", "star"]):
                grid = await world.studio.submit_imagine("discord:9", f"a {shape} --seed {index} --steps 6")
                await double.wait_for(lambda: _done(world.studio, grid.id), 120, "a grid")
                for image in (await world.studio.job(grid.id)).images:
                    await world.studio.community.vote(image.id, "discord:3001", 1 if image.index <= 2 else -1)
            started = await double.slash(world.alice, "personalize", {"start": True})

            def learned():
                message = double.original(started)
                return message if message and "Top row: the base" in message["content"] else None

            message = await double.wait_for(learned, 180, "the learning job's result")
            assert "p-discord-3001-starter-shapes-v1" in message["content"] and "personal style" in message["content"]
            sheet = world.image_of(double.file_of(message))
            assert sheet.width >= 4 * 192 and sheet.height >= 2 * 192  # four columns, two rows
            edits = [request.json.get("content", "") for request in double.requests
                     if request.method == "PATCH" and request.json and "step" in (request.json.get("content") or "")]
            assert any("loss" in content for content in edits), edits[-3:]

    run(scenario())


async def _done(studio, job_id: int) -> bool:
    return (await studio.job(job_id)).status == "done"


def test_routing_learns_from_a_members_choice_and_admins_can_forget_it(engine, tmp_path):
    async def scenario():
        async with BotWorld(engine, tmp_path) as world:
            double, studio = world.double, world.studio

            async def reply(member, options=None):
                handle = await double.slash(member, "admin", options or {}, subcommand="routing")
                await double.wait_for(lambda: handle.callbacks, 60, "/admin routing")
                return handle.callbacks[0]["data"]["content"]

            assert "No learned routing examples on this server yet" in await reply(world.admin)
            # Alice picks the model herself with the slash option; Bob likes the result with a reaction.
            _, grid_message, grid = await world.imagine(world.alice, f"a cozy slice of life scene in a bakery {QUICK}",
                                                        extra={"model": "starter-shapes"})
            await double.react(world.bob, grid_message["id"], "\U0001f44d")
            guild = str(double.guild_id)

            # A grid's reaction votes for its four images, one after the other, each learning the prompt again.
            await double.wait_for(_votes(studio, grid.id, (1, 0)), 60, "bob's votes")

            async def learned():
                return await studio.route_examples(guild)
            examples = await double.wait_for(learned, 60, "the learned example")
            await asyncio.sleep(0.5)  # the last vote's learning, which follows its tally
            assert [(e["text"], e["target"], e["chosen_by"]) for e in examples] == [
                ("a cozy slice of life scene in a bakery", "starter-shapes", "discord:3001")]
            listed = await reply(world.admin)
            assert f"#{examples[0]['id']} **starter-shapes**" in listed and "<@3001>" in listed
            assert "Manage Server" in await world.error_reply(
                await double.slash(world.bob, "admin", {"clear": True}, subcommand="routing"))
            assert "Forgot 1 example(s)." in await reply(world.admin, {"forget": examples[0]["id"]})
            assert await studio.route_examples(guild) == []

    run(scenario())


def test_admins_compare_seeds_and_settings_on_one_labelled_grid(engine, tmp_path):
    async def scenario():
        import io

        from PIL import Image as PILImage

        from storage.gallery import GalleryQuery

        async with BotWorld(engine, tmp_path) as world:
            double, studio = world.double, world.studio
            assert "Manage Server" in await world.error_reply(await double.slash(
                world.bob, "admin", {"prompt": "a red circle", "x": "seed=1,2"}, subcommand="compare"))
            refused = await double.slash(world.admin, "admin", {"prompt": "a red circle", "x": "cfg=1,99"},
                                         subcommand="compare")
            assert "cfg 99 is outside 1..30" in await world.error_reply(refused)
            handle = await double.slash(world.admin, "admin", {
                "prompt": f"a yellow star on a blue background --seed 3 {QUICK}",
                "x": "seed=3,4", "y": "cfg=3,7"}, subcommand="compare")

            def delivered():
                message = double.original(handle)
                return message if message and message["attachments"] and "(job" in message["content"] else None
            message = await double.wait_for(delivered, 180, "the comparison grid")
            assert message["components"] == []  # no upscale or variation buttons on a comparison board
            grid = PILImage.open(io.BytesIO(double.file_of(message)))
            assert grid.width > 2 * 160 and grid.height > 2 * 160  # two columns, two rows, labelled
            job = await world.job_of(message)
            assert job.kind == "compare" and len(job.images) == 1
            _, _, made = await world.imagine(world.alice, f"a red circle {QUICK}")
            page, _ = await studio.showcase.gallery(GalleryQuery(period="all", viewer_guilds=(str(double.guild_id),)))
            shown = [item.image_id for item in page]
            assert made.images[0].id in shown and job.images[0].id not in shown  # boards stay out of the gallery
            status = await double.slash(world.admin, "admin", {}, subcommand="status")
            await double.wait_for(lambda: status.callbacks, 60, "/admin status")
            assert "worker(s)** alive · 0 queued · 0 running" in status.callbacks[0]["data"]["content"]

    run(scenario())


def test_the_bot_runs_as_many_shards_as_discord_recommends(engine, tmp_path):
    # Past 2 500 servers Discord requires shards; GET /gateway/bot says how many. Here the double asks for two: the
    # bot identifies both, and the shard that holds the server takes /imagine as before.
    async def scenario():
        async with BotWorld(engine, tmp_path, recommended_shards=2) as world:
            double = world.double
            await double.wait_for(lambda: len(double.identified_shards) == 2, 60, "both shards")
            assert sorted(double.identified_shards) == [[0, 2], [1, 2]]
            assert world.bot.shard_count == 2
            _, message, job = await world.imagine(world.alice, f"a red circle on a blue background --seed 7 {QUICK}")
            assert job.status == "done" and message["components"]

    run(scenario())
