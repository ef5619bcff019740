"""The `dreamloom` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from dreamloom.errors import DreamloomError, InvalidRequest

EXIT_USER_ERROR = 2


def _print_progress(stream):
    """Step progress on a terminal, rewritten in place; nothing per step when stderr is a file or a pipe
    (a log gets no line per step: the result line says how long it took)."""
    if not stream.isatty():
        return None

    def on_step(progress) -> None:
        end = "\n" if progress.step == progress.total else "\r"
        print(f"  step {progress.step}/{progress.total}", end=end, file=stream, flush=True)

    return on_step


def _engine(settings):
    from engine.registry import load_registry
    from engine.service import Engine

    budget = settings.model_memory_budget_mb * 2**20 if settings.model_memory_budget_mb else None
    return Engine(load_registry(settings.registry), settings.cache_dir, device=settings.device, memory_budget_bytes=budget,
                  embedding_cache_size=settings.embedding_cache_size, threads=settings.torch_threads)


def _source(path: Path):
    """An input image and what its PNG metadata says about how it was made (empty when it says nothing usable)."""
    from engine.images import open_image
    from engine.metadata import read_parameters

    image = open_image(path)
    found = read_parameters(image)
    made = found.get("dreamloom")
    made = made if isinstance(made, dict) else {}
    if not isinstance(made.get("raw_prompt"), str):
        made.pop("raw_prompt", None)
    if not isinstance(made.get("settings"), dict):
        made.pop("settings", None)
    if "raw_prompt" not in made and isinstance(found.get("prompt"), str) and found["prompt"].strip():
        made["raw_prompt"] = found["prompt"]  # an A1111 / ComfyUI PNG: its `parameters` text has the prompt
    return image, made


def _source_prompt(args, made: dict[str, Any]):
    from dreamloom.errors import InvalidRequest
    from engine.params import parse_prompt

    text = args.prompt if args.prompt is not None else made.get("raw_prompt")
    if text is None or not text.strip():
        raise InvalidRequest(f"{Path(args.image).name} carries no prompt (no Dreamloom or A1111 parameters); "
                             'say what it shows with --prompt "...".')
    prompt = parse_prompt(text, allow_empty=True)
    model = args.model or prompt.model or made.get("settings", {}).get("model")
    return dataclasses.replace(prompt, model=model if isinstance(model, str) else None)


def _publish(args, settings, kind: str, raw_prompt: str, result, started_at, source: Path | None = None,
             mode: str | None = None):
    """With --publish: keep the result as a finished job of `cli:USER`, so it joins the gallery."""
    import asyncio
    import getpass
    import hashlib

    user = args.user or re.sub(r"[^A-Za-z0-9._-]", "-", getpass.getuser())[:60] or "owner"

    async def work(studio):
        sha = hashlib.sha256(source.read_bytes()).hexdigest() if source is not None else None
        return await studio.publish_result(f"cli:{user}", kind, raw_prompt, result,
                                           started_at=started_at, source_sha256=sha, mode=mode)

    return asyncio.run(_with_studio(settings, work))


def _member_name(text: str) -> str:
    """A `--user` for --publish (the member `cli:NAME`), checked as the arguments are read: before any generation."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,60}", text):
        raise argparse.ArgumentTypeError(f"--user takes letters, digits, '.', '_' and '-' (up to 60); got {text[:60]!r}.")
    return text


def _finish(args, settings, kind: str, raw_prompt: str, result, started_at, source: Path | None = None,
            mode: str | None = None) -> dict[str, Any]:
    """Write the result's files (and publish it when asked); the JSON document `imagine`/`vary`/`upscale` print."""
    from studio.outputs import write_result

    outputs = Path(args.out) if args.out else settings.outputs_dir
    if not args.publish:
        return write_result(result, outputs, raw_prompt, str(source) if source else None).to_dict()
    job = _publish(args, settings, kind, raw_prompt, result, started_at, source, mode)
    # A published image carries no local path (it is public); its copy here is the same file as the gallery's.
    document = write_result(result, outputs, raw_prompt, None, job_id=job.id).to_dict()
    document["published"] = {"job": job.id, "images": [image.id for image in job.images],
                             "gallery": f"{settings.gallery_url}/image/{job.images[0].id}"}
    return document


def cmd_imagine(args, settings) -> dict[str, Any]:
    from engine.generation import ImagineRequest
    from engine.images import open_image
    from engine.params import parse_prompt
    from storage.models import utcnow

    image = open_image(Path(args.image)) if args.image else None
    prompt = parse_prompt(args.prompt, allow_empty=image is not None)
    if args.model:
        prompt = dataclasses.replace(prompt, model=args.model)
    started_at = utcnow()
    engine = _engine(settings)
    prompt = _with_learned_styles(settings, engine, prompt)
    result = engine.imagine(ImagineRequest(prompt, image), on_step=None if args.quiet else _print_progress(sys.stderr))
    return _finish(args, settings, "imagine", args.prompt, result, started_at)


def _has_database(settings) -> bool:
    """Whether a database exists (a configured URL, or the data directory's SQLite file): the CLI never makes one."""
    return bool(settings.database_url) or (Path(settings.data_dir) / "dreamloom.db").is_file()


def _with_learned_styles(settings, engine, prompt):
    """The house style of the prompt's model (as `--stylize` / `--style raw` say), as queued jobs get it. Only when a
    database exists: a fresh data directory has no learned styles, and `imagine` should not create one."""
    import asyncio

    if not _has_database(settings):
        if prompt.personalize:
            from dreamloom.errors import InvalidPrompt

            raise InvalidPrompt("--p needs a personal style, and this data directory has none yet.", "p")
        return prompt

    async def work(studio):
        spec, routed = engine.plan(prompt)
        choices, _ = await studio.learned_choices(routed, spec, "cli:owner")
        return choices, studio.runtime_registry()

    choices, registry = asyncio.run(_with_studio(settings, work))
    if not choices:
        return prompt
    engine.registry = registry
    return dataclasses.replace(prompt, loras=tuple(prompt.loras) + tuple(choices))


def cmd_vary(args, settings) -> dict[str, Any]:
    from engine.generation import VaryRequest
    from storage.models import utcnow

    image, made = _source(Path(args.image))
    prompt = dataclasses.replace(_source_prompt(args, made), seed=args.seed, n=args.n)
    started_at = utcnow()
    engine = _engine(settings)
    mode = "strong" if args.strong else "subtle"
    result = engine.vary(VaryRequest(image, prompt, mode), on_step=None if args.quiet else _print_progress(sys.stderr))
    return _finish(args, settings, "vary", prompt.raw, result, started_at, Path(args.image), mode)


def cmd_upscale(args, settings) -> dict[str, Any]:
    from engine.generation import UpscaleRequest
    from storage.models import utcnow

    image, made = _source(Path(args.image))
    seed = args.seed if args.seed is not None else made.get("seed")
    prompt = dataclasses.replace(_source_prompt(args, made), seed=seed if isinstance(seed, int) else None, n=1)
    started_at = utcnow()
    engine = _engine(settings)
    mode = "creative" if args.creative else "detail"
    result = engine.upscale(UpscaleRequest(image, prompt, mode),
                            on_step=None if args.quiet else _print_progress(sys.stderr))
    return _finish(args, settings, "upscale", prompt.raw, result, started_at, Path(args.image), mode)


def cmd_route(args, settings) -> dict[str, Any]:
    """The decision for a prompt; with a database, with the learned examples of `--guild` (or of the web/CLI)."""
    import asyncio

    from engine.params import parse_prompt
    from engine.registry import load_registry
    from engine.routing import route

    if not _has_database(settings):
        return route(load_registry(settings.registry), parse_prompt(args.prompt)).to_dict(explain=args.explain)

    async def work(studio):
        await studio.refresh_route_examples(args.guild)
        return studio.route(args.prompt, owner=True, guild_id=args.guild).to_dict(explain=args.explain)

    return asyncio.run(_with_studio(settings, work))


def cmd_route_examples(args, settings) -> dict[str, Any]:
    """List the learned routing examples, or forget some."""
    import asyncio

    async def work(studio):
        forgotten = None
        if args.forget or args.forget_all:
            # The owner forgets an example by id wherever it is, unless --guild narrows it.
            forgotten = await studio.forget_route_examples(ids=args.forget, guild_id=args.guild, target=args.target,
                                                           all_servers=args.all or bool(args.forget and not args.guild))
        listed = await studio.route_examples(args.guild, args.target, all_servers=args.all)
        return {"forgotten": forgotten, "examples": listed}

    return asyncio.run(_with_studio(settings, work))


def cmd_train_lora(args, settings) -> dict[str, Any]:
    from engine.registry import load_registry
    from engine.service import pick_device
    from engine.training.train_lora import train_lora

    base = load_registry(settings.registry).resolve(args.base)
    report = train_lora(Path(args.dataset), base, args.trigger, Path(args.out), steps=args.steps, rank=args.rank,
                        lr=args.lr, batch=args.batch, seed=args.seed, device=pick_device(settings.device),
                        cache_dir=settings.cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    return report.to_dict()


def _merge_recipe(args):
    """The recipe file (if any) with the flags on top."""
    from engine.recipe import MergeRecipe, read_recipe_file

    document: dict[str, Any] = read_recipe_file(Path(args.recipe)) if args.recipe else {}
    for field_name in ("a", "b", "c", "method", "alpha", "text_encoder", "vae", "density", "seed", "dtype"):
        value = getattr(args, field_name)
        if value is not None:
            document[field_name] = value
    if args.blocks:
        document["blocks"] = _key_values(args.blocks, "--blocks")
    if args.block_weights:
        document["block_weights"] = _floats(args.block_weights, "--block-weights")
    if args.lora:
        document["loras"] = [{"name": name, "weight": weight} for name, weight in
                             _key_values(",".join(args.lora), "--lora", separator=":").items()]
    if "a" not in document or "b" not in document:
        raise InvalidRequest("Name the models to merge: a recipe file with `a` and `b`, or --a and --b.")
    return MergeRecipe.from_dict(document)


def _key_values(text: str, flag: str, separator: str = "=") -> dict[str, float]:
    """`input=0,output=1` (or `outline:0.8,night` with separator ':'; a missing number means 1)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, found, value = item.rpartition(separator)
        if not found:
            key, value = item, "1"
        try:
            result[key.strip()] = float(value)
        except ValueError:
            raise InvalidRequest(f"{flag}: {item!r} is not name{separator}number.") from None
    return result


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise InvalidRequest(f"{flag} takes numbers separated by commas.") from None


def cmd_merge(args, settings) -> dict[str, Any]:
    import time

    from engine.hashes import FileHashes
    from engine.merge import output_config, merge_metadata, plan_merge, write_diffusers, write_merge
    from engine.registry import load_registry, register_model

    recipe = _merge_recipe(args)
    registry = load_registry(settings.registry)
    plan = plan_merge(recipe, registry, allow_paths=True)  # the owner's CLI may name files
    document: dict[str, Any] = {"recipe": recipe.to_dict(), "plan": plan.describe(), "keys": len(plan.keys)}
    if args.dry_run:
        return document
    if not args.out and not args.register:
        raise InvalidRequest("Say where the merge goes: --out FILE.safetensors (or a folder with --format diffusers), "
                             "or --register NAME.")
    folder = args.format == "diffusers"
    out = Path(args.out) if args.out else Path(settings.registry).parent / "merges" / (
        args.register + ("" if folder else ".safetensors"))
    if not folder and out.suffix != ".safetensors":
        raise InvalidRequest("--out names a .safetensors file (or use --format diffusers for a folder).")
    title = args.register or out.stem
    started = time.perf_counter()
    metadata = merge_metadata(plan, FileHashes(settings.cache_dir / "file-hashes.json"), title)
    written = write_diffusers(plan, out, metadata, settings.cache_dir) if folder else write_merge(plan, out, metadata)
    document.update(out=str(written), seconds=round(time.perf_counter() - started, 2))
    if args.register:
        family = plan.sources["a"].spec.family
        config = None if folder else output_config(plan)
        parents = " and ".join(source.name for label, source in sorted(plan.sources.items()) if label != "c")
        register_model(settings.registry, name=args.register, path=written, family=family, config=config,
                       description=f"A merge of {parents} ({recipe.method}, alpha {recipe.alpha:g}).", tags=("merge",))
        document["registered"] = args.register
    return document


def cmd_xy(args, settings) -> dict[str, Any]:
    import time

    from engine.compare import CompareRequest, cells, parse_axes
    from engine.params import parse_prompt
    from engine.recipe import MergeRecipe

    x, y = parse_axes(args.x, args.y)
    engine = _engine(settings)
    recipe = MergeRecipe.from_toml(Path(args.recipe)) if args.recipe else None
    if recipe is None and args.merge_with:
        base = parse_prompt(args.prompt).model
        recipe = MergeRecipe.from_dict({"a": base or engine.registry.default, "b": args.merge_with})
    request = CompareRequest(parse_prompt(args.prompt), x, y, recipe)
    request.check()
    started = time.perf_counter()
    result = engine.compare(request, on_step=None if args.quiet else _print_progress(sys.stderr))
    out = Path(args.out) if args.out else settings.data_dir / "outputs" / f"xy-{int(time.time())}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    return {"grid": str(out), "cells": len(cells(request)), "x": x.to_text(), "y": y.to_text() if y else None,
            "seconds": round(time.perf_counter() - started, 2)}


def cmd_status(args, settings) -> dict[str, Any]:
    import asyncio

    return asyncio.run(_with_studio(settings, lambda studio: studio.status()))


def cmd_models(args, settings) -> dict[str, Any]:
    from engine.registry import load_registry

    registry = load_registry(settings.registry)
    return {
        "registry": str(registry.source), "default": registry.default,
        "models": [{"name": s.name, "family": s.family, "path": str(s.path), "tags": list(s.tags),
                    "description": s.description, "installed": s.path.exists()} for s in registry.models.values()],
        "loras": [{"name": s.name, "family": s.family, "path": str(s.path), "triggers": list(s.triggers),
                   "weight": s.weight, "description": s.description, "installed": s.path.exists()}
                  for s in registry.loras.values()],
    }


async def _with_studio(settings, work):
    from studio.service import Studio

    studio = await Studio.open(settings)
    try:
        return await work(studio)
    finally:
        await studio.close()


def cmd_serve(args, settings) -> dict[str, Any]:
    import asyncio
    import logging

    from studio.worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The log tells what happens to jobs; libraries' start-up chatter (migrations, model files) only at WARNING.
    for chatty in ("alembic", "httpx", "aiohttp.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.command == "worker":  # the engine only: no front doors, and other workers beside it
        asyncio.run(serve(settings, announce=lambda line: print(line, flush=True), front_doors=(), recover=False))
        return {"stopped": True}
    front_doors = []
    if settings.gallery_port:
        from gallery.app import start_gallery  # the composition root wires the front doors

        front_doors.append(start_gallery)
    if settings.discord_token:
        from bot.app import start_bot

        front_doors.append(start_bot)
    asyncio.run(serve(settings, announce=lambda line: print(line, flush=True), front_doors=front_doors,
                      work=not args.no_worker))
    return {"stopped": True}


def cmd_submit(args, settings) -> dict[str, Any]:
    import asyncio
    import time

    from studio.service import TERMINAL

    async def work(studio):
        view = await studio.submit_imagine(args.user, args.prompt, owner=True)
        if args.wait:
            deadline = time.monotonic() + args.timeout
            while view.status not in TERMINAL:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
                view = await studio.job(view.id)
        return view.to_dict()

    return asyncio.run(_with_studio(settings, work))


def cmd_jobs(args, settings) -> dict[str, Any]:
    import asyncio

    async def work(studio):
        return {"jobs": [v.to_dict() for v in await studio.jobs(args.user, args.status, args.limit)]}

    return asyncio.run(_with_studio(settings, work))


def cmd_show(args, settings) -> dict[str, Any]:
    import asyncio

    async def work(studio):
        view = (await studio.job(args.job)).to_dict()
        view["lineage"] = [await studio.showcase.lineage(image["id"]) for image in view["images"]]
        return view

    return asyncio.run(_with_studio(settings, work))


def cmd_cancel(args, settings) -> dict[str, Any]:
    import asyncio
    import time

    from studio.service import TERMINAL

    async def work(studio):
        view = await studio.cancel(args.job, args.user)
        # A running job stops at its next step, in whichever process runs it: wait a little to report the outcome.
        deadline = time.monotonic() + args.wait
        while view.status == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            view = await studio.job(args.job)
        document = view.to_dict()
        if view.status not in TERMINAL:
            document["note"] = "cancel requested: it stops at its next step (is `dreamloom serve` running?)"
        return document

    return asyncio.run(_with_studio(settings, work))


def cmd_vote(args, settings) -> dict[str, Any]:
    import asyncio

    from dreamloom.errors import InvalidRequest

    values = {"+1": 1, "1": 1, "up": 1, "-1": -1, "down": -1}
    if args.value not in values and args.value not in ("0", "none"):
        raise InvalidRequest(f"A vote is +1 or -1 (or 0 to remove it); got {args.value}.")

    async def work(studio):
        if args.value in ("0", "none"):
            up, down = await studio.community.unvote(args.image, args.user)
        else:
            up, down = await studio.community.vote(args.image, args.user, values[args.value], source="cli")
        return {"image": args.image, "user": args.user, "up": up, "down": down}

    return asyncio.run(_with_studio(settings, work))


def cmd_ban(args, settings) -> dict[str, Any]:
    import asyncio

    async def work(studio):
        removed = await studio.set_banned(args.user, not args.unban, purge_votes=args.purge_votes)
        return {"user": args.user, "banned": not args.unban, "votes_removed": removed}

    return asyncio.run(_with_studio(settings, work))


def cmd_learn(args, settings) -> dict[str, Any]:
    import asyncio
    import sys

    async def work(studio):
        if args.now:
            view = await studio.learn(args.model, voter=args.user, objective=args.objective, steps=args.steps,
                                      log_line=lambda line: print(line, file=sys.stderr, flush=True))
            return view.to_dict()
        job = await studio.submit_learn("cli:owner", args.model, voter=args.user, objective=args.objective,
                                        steps=args.steps)
        return job.to_dict() | {"note": "`dreamloom serve` runs it between generations; `dreamloom jobs` shows its "
                                        f"progress and `dreamloom cancel {job.id}` stops it."}

    return asyncio.run(_with_studio(settings, work))


def cmd_styles(args, settings) -> dict[str, Any]:
    import asyncio

    async def work(studio):
        changed = None
        for status, name in (("active", args.activate), ("candidate", args.deactivate), ("retired", args.retire)):
            if name:
                changed = (await studio.set_style_status(name, status)).to_dict()
        return {"changed": changed, "styles": [view.to_dict() for view in await studio.styles(args.model, owner=args.user)]}

    return asyncio.run(_with_studio(settings, work))


def cmd_export(args, settings) -> dict[str, Any]:
    import asyncio
    from datetime import datetime, timezone

    from dreamloom.errors import InvalidRequest
    from storage.export import ExportFilter, KohyaLayout

    def day(text):
        if text is None:
            return None
        try:
            return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
        except ValueError:
            raise InvalidRequest(f"Dates look like 2026-11-22; got {text!r}.") from None

    filters = ExportFilter(min_score=args.min_score, model=args.model, lora=args.lora, since=day(args.since),
                           until=day(args.until), guild_id=args.guild)

    async def work(studio):
        report = await studio.export(Path(args.folder), args.format, filters,
                                     KohyaLayout(args.trigger, args.class_word, args.repeats))
        return {"folder": str(report.folder), "format": report.format, "images": report.images, "pairs": report.pairs}

    return asyncio.run(_with_studio(settings, work))


def cmd_db(args, settings) -> dict[str, Any]:
    import asyncio

    from storage.database import Database, sqlite_url

    async def work():
        db = Database(settings.database_url or sqlite_url(settings.data_dir))
        try:
            before = await db.revision()
            await db.upgrade()
            return {"database": db.safe_url, "from": before, "to": await db.revision()}
        finally:
            await db.close()

    return asyncio.run(work())


def _explanation_lines(explanation: dict[str, Any]) -> list[str]:
    """`route --explain`: each entry's score and nearest examples, then the margins the decision compared."""
    lines = [f"scores (mean similarity of the {explanation['top_k']} nearest examples; "
             f"{explanation['learned_examples']} learned example(s) on this server):"]
    for name, score in explanation.get("scores", {}).items():
        lines.append(f"  {name:<18} {score['score']:.3f}")
        lines += [f"      {similarity:.3f}  {text}  [{source}]" for text, similarity, source in score["nearest"]]
    for kind, needed in (("models", explanation["model_margin"]), ("loras", explanation["lora_margin"])):
        for name, margin in explanation.get(kind, {}).items():
            verdict = "chosen by margin" if margin["margin"] >= needed else "not chosen"
            lines.append(f"  {name}: margin {margin['margin']:+.3f} over {margin['rival']} (needs {needed:+.2f}): {verdict}")
    return lines


def _human(command: str, document: dict[str, Any]) -> str:
    if command in ("serve", "worker"):
        return ""
    if command == "route":
        loras = ", ".join(f"{l['name']}:{l['weight']}" for l in document["loras"]) or "none"
        lines = [f"model: {document['model']}", f"LoRAs: {loras}", f"prompt: {document['prompt']}",
                 *(f"  - {reason}" for reason in document["reasons"])]
        if "explanation" in document:
            lines += _explanation_lines(document["explanation"])
        return "\n".join(lines)
    if command == "route-examples":
        lines = [f"forgot {document['forgotten']} example(s)"] if document["forgotten"] is not None else []
        lines += [f"#{e['id']:<6} {e['target']:<16} weight {e['weight']:.2f}  {e['server']:<20} {e['text']}"
                  f"  (chosen by {e['chosen_by']}, {e['up_votes']} up-vote(s), {e['learned_at'][:10]})"
                  for e in document["examples"]]
        return "\n".join(lines) or ("no learned routing examples yet: they come from prompts whose members chose a "
                                    "model or LoRA themselves and that others up-voted")
    if command == "status":
        lines = [f"{len(document['workers'])} worker(s) alive; {document['queued']} job(s) queued, "
                 f"{document['running']} running" + (f", about {document['eta_s']:.0f} s to clear the queue"
                                                     if document["eta_s"] is not None and document["queued"] else "")]
        lines += [f"  {w['id']:<34} {w['device']:<8} job {w['current_job'] or '-':<6} {w['memory_mb'] or 0:>8.0f} MiB  "
                  f"models: {', '.join(w['models']) or 'none loaded'}  (heard {w['heartbeat_s_ago']:.0f} s ago)"
                  for w in document["workers"]]
        if not document["workers"]:
            lines.append("  no worker is running: start `dreamloom serve` or `dreamloom worker`")
        return "\n".join(lines)
    if command == "xy":
        return f"wrote {document['grid']} ({document['cells']} cells in {document['seconds']:.1f} s)"
    if command == "merge":
        lines = list(document["plan"])
        if "out" in document:
            lines.append(f"wrote {document['out']} in {document['seconds']:.1f} s"
                         + (f"; registered as {document['registered']}" if document.get("registered") else ""))
        else:
            lines.append(f"(dry run: {document['keys']} keys; nothing written)")
        return "\n".join(lines)
    if command == "train-lora":
        return f"wrote {document['out']} ({document['steps']} steps on {document['images']} images, loss {document['first_loss']} -> {document['last_loss']})"
    if command == "learn" and "kind" in document and document["kind"] == "learn":
        return f"queued learning job {document['id']}: {document['raw_prompt']}\n{document['note']}"
    if command == "learn":
        evaluation = document["evaluation"]
        verdict = "now active" if document["status"] == "active" else evaluation.get("not_promoted", document["status"])
        return (f"learned {document['name']} ({document['objective']}, {document['steps']} steps, "
                f"{document['liked']} liked / {document['disliked']} disliked images): held-out accuracy "
                f"{evaluation['held_out_accuracy']:.2f} vs the base's 0.50; {verdict}")
    if command == "styles":
        lines = [f"{s['name']:<36} {s['status']:<9} {s['kind']:<8} {s['objective']:<4} acc "
                 f"{s['evaluation'].get('held_out_accuracy', 0):.2f}  {s['liked']} liked / {s['disliked']} disliked  "
                 f"{s['created_at']}" for s in document["styles"]]
        return "\n".join(lines) or "no learned styles yet: `dreamloom learn` makes one from the votes"
    if command == "db":
        return f"database {document['database']}: revision {document['from']} -> {document['to']}"
    if command == "vote":
        return f"image {document['image']}: {document['up']} up, {document['down']} down"
    if command == "ban":
        if not document["banned"]:
            return f"{document['user']} may generate and vote again"
        return f"{document['user']} is banned; {_count(document['votes_removed'], 'vote')} removed"
    if command == "export":
        pairs = f", {_count(document['pairs'], 'pair')}" if document["format"] == "pairs" else ""
        return f"exported {_count(document['images'], 'image')}{pairs} ({document['format']}) to {document['folder']}"
    if command == "jobs":
        return "\n".join(f"{j['id']:>6}  {j['status']:<9} {j['kind']:<8} {j['user_id']:<16} {j['raw_prompt'][:60]}"
                         + _learning_progress(j) for j in document["jobs"]) or "no jobs"
    if command in ("submit", "show", "cancel"):
        lines = [f"job {document['id']}: {document['status']} ({document['kind']}, model {document['model']}, seed {document['seed']})"]
        if document.get("position") is not None:
            lines.append(f"queue position {document['position']}, about {document['eta_seconds']:.0f} s")
        if document.get("error"):
            lines.append(document["error"] if document["status"] == "cancelled" else f"error: {document['error']}")
        if document.get("note"):
            lines.append(document["note"])
        if document["kind"] == "learn":
            settings = document.get("settings") or {}
            lines.append(settings.get("summary") or _learning_progress(document).strip() or "not started")
        lines += [f"image {i['id']} (#{i['index']}, seed {i['seed']}, {i['up']} up / {i['down']} down): {i['path']}"
                  for i in document["images"]]
        return "\n".join(lines)
    if command == "models":
        lines = ["models:"] + [f"  {m['name']:<24} {m['family']:<8} {'ok' if m['installed'] else 'MISSING':<8} "
                               f"{m['description']}" for m in document["models"]]
        lines += ["LoRAs:"] + [f"  {l['name']:<24} {l['family']:<8} {'ok' if l['installed'] else 'MISSING':<8} "
                               f"{l['description']} (weight {l['weight']:g}"
                               + (f"; trigger {', '.join(l['triggers'])}" if l["triggers"] else "") + ")"
                               for l in document["loras"]] if document["loras"] else ["LoRAs: none registered"]
        return "\n".join(lines + [f"(default: {document['default']}; registry: {document['registry']})"])
    p = document["parameters"]
    lines = []
    if document["grid"]:
        lines.append(f"grid: {document['grid']}")
    lines += [f"image {i['index']}: {i['path']}  (seed {i['seed']})" for i in document["images"]]
    lines.append(f"model {p['model']} ({p['family']}), {p['width']}x{p['height']}, {p['steps']} steps, "
                 f"sampler {p['sampler']}, cfg {p['cfg']:g}" + (f", strength {p['strength']:g}" if p["strength"] else "")
                 + (f", chaos {p['chaos']}" if p["chaos"] else ""))
    lines.append(f"prompt: {p['prompt']}" + (f"  --no {p['negative_prompt']}" if p["negative_prompt"] else ""))
    loras = ", ".join(f"{l['name']}:{l['weight'] if l['weight'] is not None else 1:g}" for l in p.get("loras") or [])
    lines.append(f"LoRAs: {loras or 'none'}")
    if document.get("timings"):
        lines.append("took " + ", ".join(f"{key[:-2]} {value:.2f} s" for key, value in document["timings"].items()))
    if document.get("published"):
        lines.append(f"in the gallery as job {document['published']['job']}: {document['published']['gallery']}")
    return "\n".join(lines)


def _learning_progress(job: dict[str, Any]) -> str:
    """`  step 40/200, loss 0.4123` for a learning job that has started; `` otherwise."""
    progress = (job.get("settings") or {}).get("progress") if job["kind"] == "learn" else None
    if not progress:
        return ""
    loss = f", loss {progress['loss']:.4f}" if progress.get("loss") is not None else ""
    return f"  step {progress['step']}/{progress['steps']}{loss}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def build_parser() -> argparse.ArgumentParser:
    from engine.recipe import DTYPES, METHODS  # torch-free: the parser stays quick to build

    parser = argparse.ArgumentParser(prog="dreamloom", description="Dreamloom: a Midjourney you run yourself.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        return sub

    imagine = add("imagine", "Generate a 2x2 grid from a prompt (Midjourney syntax: --ar 3:2 --seed 7 ...).")
    imagine.add_argument("prompt")
    imagine.add_argument("--model", help="registered model name or path to a checkpoint (overrides --model in the prompt)")
    imagine.add_argument("--image", help="an image prompt (weight with --iw in the prompt)")
    imagine.add_argument("--out", help="output folder (default DATA_DIR/outputs)")
    imagine.add_argument("--quiet", action="store_true", help="no step progress on stderr")
    imagine.add_argument("--publish", action="store_true", help="also keep the result in the studio: it joins the gallery")
    imagine.add_argument("--user", type=_member_name,
                         help="with --publish: the member name it is published as (default: your login)")
    for name, text in (("vary", "Make variations of an image (4 by default)."),
                       ("upscale", "Make a 2x upscale of an image with a detail pass.")):
        sub = add(name, text)
        sub.add_argument("image", help="a PNG written by Dreamloom (its prompt and model are read from it) or any image")
        sub.add_argument("--prompt", help="prompt to use instead of the one stored in the image")
        sub.add_argument("--model", help="model to use instead of the one stored in the image")
        sub.add_argument("--seed", type=int, help="seed (default: random for vary, the source's for upscale)")
        sub.add_argument("--out", help="output folder (default DATA_DIR/outputs)")
        sub.add_argument("--quiet", action="store_true", help="no step progress on stderr")
        sub.add_argument("--publish", action="store_true", help="also keep the result in the studio: it joins the gallery")
        sub.add_argument("--user", type=_member_name,
                         help="with --publish: the member name it is published as (default: your login)")
        if name == "vary":
            sub.add_argument("--strong", action="store_true", help="strong variations (default subtle)")
            sub.add_argument("--n", type=int, default=4, choices=range(1, 5), help="number of variations (1-4)")
        else:
            sub.add_argument("--creative", action="store_true", help="repaint more detail (default: stay close)")
    add("models", "List the registered models and LoRAs.")
    route_parser = add("route", "Show which model and LoRAs a prompt would use, and why (generates nothing).")
    route_parser.add_argument("prompt")
    route_parser.add_argument("--explain", action="store_true",
                              help="show each entry's nearest examples and the margins behind the decision")
    route_parser.add_argument("--guild", help="route with this Discord server's learned examples (default: the web/CLI's)")
    examples_parser = add("route-examples", "List the routing examples learned from members' explicit choices, or "
                                            "forget some.")
    examples_parser.add_argument("--guild", help="this Discord server's examples (default: the web/CLI's)")
    examples_parser.add_argument("--all", action="store_true", help="every server's examples")
    examples_parser.add_argument("--target", help="only the examples of this model or LoRA")
    examples_parser.add_argument("--forget", type=int, nargs="+", metavar="ID", help="remove these examples")
    examples_parser.add_argument("--forget-all", action="store_true",
                                 help="remove every listed example (of --guild / --all, --target)")
    train = add("train-lora", "Train a LoRA on a dataset folder (e.g. from `dreamloom export`); writes kohya's layout.")
    train.add_argument("dataset", help="an imagefolder (metadata.jsonl), a kohya folder of `N_trigger class/` "
                                       "subfolders, or images with .caption / .txt captions")
    train.add_argument("--base", required=True, help="registered model name or checkpoint path")
    train.add_argument("--trigger", required=True, help="the trigger word put in every caption")
    train.add_argument("--out", required=True, help="the .safetensors file to write")
    train.add_argument("--steps", type=int, default=400)
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--seed", type=int, default=0)

    merge = add("merge", "Merge models into a new checkpoint (weighted sum, add-difference, TIES, DARE; per-block ratios, "
                         "a text-encoder ratio, LoRAs baked in).")
    merge.add_argument("recipe", nargs="?", help="a recipe TOML file (flags override its fields)")
    merge.add_argument("--a", help="model A: a registered name or a checkpoint path")
    merge.add_argument("--b", help="model B")
    merge.add_argument("--c", help="model C: the base for add_difference, ties and dare")
    merge.add_argument("--method", choices=METHODS)
    merge.add_argument("--alpha", type=float, help="B's share (weighted sum) or the difference's multiplier")
    merge.add_argument("--text-encoder", type=float, dest="text_encoder", help="the text encoder's own ratio")
    merge.add_argument("--vae", choices=["a", "b"], help="whose VAE the result keeps (default a)")
    merge.add_argument("--blocks", help="group ratios, e.g. input=0,middle=0.5,output=1 (FLUX: double=..,single=..)")
    merge.add_argument("--block-weights", dest="block_weights",
                       help="the full per-block list (SD1.5: 25 values IN00..OUT11, SDXL: 19)")
    merge.add_argument("--lora", action="append", help="bake a LoRA in: NAME:WEIGHT (repeatable)")
    merge.add_argument("--density", type=float, help="ties: share of each difference kept; dare: keep probability")
    merge.add_argument("--seed", type=int, help="dare's random drops")
    merge.add_argument("--dtype", choices=DTYPES)
    merge.add_argument("--out", help="the .safetensors file to write (or a new folder with --format diffusers)")
    merge.add_argument("--format", choices=["single_file", "diffusers"], default="single_file")
    merge.add_argument("--dry-run", action="store_true", help="print which keys come from where; write nothing")
    merge.add_argument("--register", metavar="NAME", help="add the result to models.toml under this name")

    xy = add("xy", "Draw a labelled X/Y comparison grid: one prompt, the same seed in every cell.")
    xy.add_argument("prompt", help="the base prompt (its --seed, else 1, is every cell's)")
    xy.add_argument("--x", required=True, help="an axis: model=A,B | seed=1,2 | cfg=3,7 | steps=10,20 | "
                                                "sampler=euler,dpmpp_2m | lora:NAME=0,0.5,1 | prompt=one|two | "
                                                "alpha=0,0.5,1 (sweeps --recipe / --merge-with)")
    xy.add_argument("--y", help="a second axis (rows)")
    xy.add_argument("--recipe", help="a merge recipe TOML whose alpha an alpha axis sweeps (nothing is written)")
    xy.add_argument("--merge-with", dest="merge_with", help="the alpha axis merges the prompt's model with this one")
    xy.add_argument("--out", help="the PNG to write (default DATA_DIR/outputs/xy-TIME.png)")
    xy.add_argument("--quiet", action="store_true", help="no progress on stderr")

    serve = add("serve", "Run the studio: work through the queue until SIGTERM (jobs survive a crash or kill -9).")
    serve.add_argument("--no-worker", action="store_true",
                       help="the front doors (gallery, Discord bot) only: `dreamloom worker` processes run the jobs")
    add("status", "The live workers (device, loaded models, current job, memory), the queue's depth and ETA.")
    add("worker", "Run jobs only (no gallery, no bot), beside other workers on the same PostgreSQL database and "
                  "image store; as many as there are GPUs.")
    submit = add("submit", "Queue a job for `dreamloom serve` and print its id.")
    submit.add_argument("prompt")
    submit.add_argument("--user", required=True, help="who asks (e.g. alice)")
    submit.add_argument("--wait", action="store_true", help="wait until the job has finished")
    submit.add_argument("--timeout", type=float, default=600, help="seconds to wait at most with --wait")
    jobs = add("jobs", "List jobs, newest first.")
    jobs.add_argument("--user")
    jobs.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=20)
    show = add("show", "A job's status, parameters, images, votes and lineage.")
    show.add_argument("job", type=int)
    cancel = add("cancel", "Cancel a queued job or stop a running one.")
    cancel.add_argument("job", type=int)
    cancel.add_argument("--user", required=True, help="the job's owner")
    cancel.add_argument("--wait", type=float, default=15, help="seconds to wait for a running job to stop (default 15)")
    vote = add("vote", "Vote on an image: +1, -1, or 0 to remove your vote.")
    vote.add_argument("image", type=int)
    vote.add_argument("value")
    vote.add_argument("--user", required=True)
    ban = add("ban", "Ban a member (discord:ID, cli:NAME): no generating or voting, images leave the gallery.")
    ban.add_argument("user")
    ban.add_argument("--purge-votes", action="store_true", help="also remove every vote they cast (counts recomputed)")
    ban.add_argument("--unban", action="store_true", help="lift the ban instead")
    export = add("export", "Export the community's best images as a training dataset.")
    export.add_argument("folder", help="a new or empty folder")
    export.add_argument("--format", choices=["imagefolder", "kohya", "dpo", "pairs"], default="imagefolder",
                        help="imagefolder (Hugging Face), kohya (sd-scripts' N_trigger class/ folders), "
                             "dpo (diffusers' Diffusion-DPO script), pairs (JSONL)")
    export.add_argument("--trigger", default="community", help="kohya: the trigger word (folder name, caption start)")
    export.add_argument("--class-word", default="style", help="kohya: the class word of the folder name")
    export.add_argument("--repeats", type=int, default=10, help="kohya: how often each image repeats per epoch")
    export.add_argument("--min-score", type=int, help="only images with at least this many net up-votes")
    export.add_argument("--model")
    export.add_argument("--lora", help="only images made with this LoRA")
    export.add_argument("--since", help="YYYY-MM-DD")
    export.add_argument("--until", help="YYYY-MM-DD (exclusive)")
    export.add_argument("--guild")
    learn = add("learn", "Learn a base model's house style (or a member's --p style) from verified votes.")
    learn.add_argument("--model", help="the base model (default: the registry's default)")
    learn.add_argument("--user", help="a member (discord:ID): their personal style from their own ratings")
    learn.add_argument("--objective", choices=["kto", "dpo", "sft"], default="kto",
                       help="kto: liked and disliked images (Diffusion-KTO); sft: liked images only")
    learn.add_argument("--steps", type=int, help="training steps (default: the learn_steps setting, 400)")
    learn.add_argument("--now", action="store_true",
                       help="train here and now instead of queueing a job for `dreamloom serve`")
    styles = add("styles", "List learned styles; activate (roll back or forward), deactivate or retire one.")
    styles.add_argument("--model")
    styles.add_argument("--user")
    styles.add_argument("--activate", metavar="NAME")
    styles.add_argument("--deactivate", metavar="NAME")
    styles.add_argument("--retire", metavar="NAME")
    db = add("db", "Database maintenance.")
    db.add_argument("action", choices=["upgrade"])
    del serve
    return parser


COMMANDS = {
    "imagine": cmd_imagine, "vary": cmd_vary, "upscale": cmd_upscale, "models": cmd_models, "serve": cmd_serve,
    "submit": cmd_submit, "jobs": cmd_jobs, "show": cmd_show, "cancel": cmd_cancel, "vote": cmd_vote, "ban": cmd_ban,
    "export": cmd_export, "db": cmd_db, "route": cmd_route, "route-examples": cmd_route_examples, "train-lora": cmd_train_lora, "learn": cmd_learn,
    "styles": cmd_styles, "merge": cmd_merge, "xy": cmd_xy, "worker": cmd_serve, "status": cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dreamloom` console script."""
    args = build_parser().parse_args(argv)
    try:
        from studio.settings import load_settings

        settings = load_settings()
        document = COMMANDS[args.command](args, settings)
    except DreamloomError as error:
        if args.json:
            print(json.dumps({"error": str(error), "type": type(error).__name__}))
        else:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.command in ("serve", "worker"):
        return 0
    print(json.dumps(document, indent=2, default=str) if args.json else _human(args.command, document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
