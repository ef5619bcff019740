"""How jobs, errors and lists read in Discord messages (text only; no Discord objects here)."""
from __future__ import annotations

from typing import Any

MAX_CONTENT = 2000

HELP_TEXT = """**/imagine** `prompt: a lighthouse in a storm --ar 16:9 --chaos 30`
Parameters: `--ar W:H` `--seed N` `--no words` `--chaos 0-100` `--stylize 0-1000` `--cfg` `--steps` `--sampler` \
`--q .25/.5/1/2` `--n 1-4` `--tile` `--iw 0-3` (with an image) `--model NAME` `--niji` `--lora NAME:0.8` or `<lora:NAME:0.8>`; \
weights with `::`, e.g. `castle::2 fog::1`.
**On a grid**: U1-U4 (or 1\u20e3-4\u20e3) upscale, V1-V4 vary, \U0001f504 reroll.
**On an upscaled image**: Vary (subtle) \U0001f3a8, Vary (strong) \U0001f300, Upscale (creative) \U0001f50d.
**Anywhere**: \U0001f44d / \U0001f44e vote (remove the reaction to take it back), \u2b50 keeps it in your favourites.
**Also**: /settings (your defaults), /models, /loras, /queue, /info, /gallery."""


def clip(text: str, limit: int = MAX_CONTENT) -> str:
    """Discord refuses messages over 2000 characters."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def user_key(user) -> str:
    """The studio's id for a Discord user (a user object or a bare id); `mention` is the way back."""
    return f"discord:{user if isinstance(user, int) else user.id}"


def mention(user_id: str) -> str:
    """`discord:123` -> `<@123>`; other front doors' users by name."""
    return f"<@{user_id.split(':', 1)[1]}>" if user_id.startswith("discord:") else user_id


def headline(job) -> str:
    """The first line of every job message: the prompt and who asked."""
    prompt = job.prompt or job.raw_prompt or "(no prompt)"
    action = {"upscale": "Upscale", "vary": "Variations", "reroll": "Reroll"}.get(job.kind)
    prefix = f"{action} of image {job.parent_image_id}: " if action and job.parent_image_id else (f"{action}: " if action else "")
    return clip(f"{prefix}**{prompt}** - {mention(job.user_id)}", 1500)


def queued(job) -> str:
    """The acknowledgement: queue position and estimated wait."""
    if job.position is None:
        return f"{headline(job)} (starting)"
    eta = f", about {round(job.eta_seconds)} s" if job.eta_seconds is not None else ""
    return f"{headline(job)} (queued: position {job.position}{eta})"


def progress(job, step: int, total: int, detail: str = "") -> str:
    """A running job (a learning job adds its loss)."""
    percent = round(100 * step / total) if total else 0
    extra = f", {detail}" if detail else ""
    return f"{headline(job)} ({percent}%, step {step}/{total}{extra})"


def finished(job) -> str:
    """A job that ended: done, failed or cancelled."""
    if job.status == "done" and job.kind == "learn":
        summary = (job.settings or {}).get("summary", "")
        return clip(f"{headline(job)} (job {job.id})\n{summary}\nTop row: the base; bottom row: the learned style, "
                    "on held-out prompts and the same seeds.")
    if job.status == "done":
        model = f" · {job.model}" if job.model else ""
        return clip(f"{headline(job)} (job {job.id} · seed {job.seed}{model})")
    if job.status == "cancelled":
        return f"{headline(job)} (cancelled)"
    return clip(f"{headline(job)}\n\u274c {job.error or 'It failed.'}")


def job_info(job, lineage: dict[str, Any] | None) -> str:
    """/info: everything about a job."""
    settings = job.settings or {}
    lines = [f"**Job {job.id}** ({job.kind}, {job.status}) by {mention(job.user_id)}",
             f"Prompt: `{job.raw_prompt}`"]
    if job.model:
        lines.append(f"Model: {job.model}" + (f" ({job.route_reason})" if job.route_reason else ""))
    if getattr(job, "cached_from_job_id", None):
        lines.append(f"From the result cache: an identical request made these pictures in job {job.cached_from_job_id}.")
    if job.loras:
        lines.append("LoRAs: " + ", ".join(f"{lora.get('name')}:{lora.get('weight')}" for lora in job.loras))
    if job.kind == "learn":
        progress = settings.get("progress") or {}
        if settings.get("summary"):
            lines.append(settings["summary"])
        elif progress:
            lines.append(f"Step {progress.get('step')}/{progress.get('steps')}, loss {progress.get('loss')}")
        if job.error:
            lines.append(f"Note: {job.error}")
        return clip("\n".join(lines))
    lines.append(f"Seed: {job.seed}")
    for key in ("width", "height", "steps", "cfg", "sampler", "chaos", "stylize"):
        if key in settings:
            lines.append(f"{key}: {settings[key]}")
    if job.images:
        lines.append("Images: " + ", ".join(f"#{image.id} (seed {image.seed}, \u25b2{image.up} \u25bc{image.down})"
                                            for image in job.images))
    if lineage and lineage.get("ancestors"):
        lines.append("From: " + " <- ".join(f"image {a['image_id']} (job {a['job_id']})" for a in lineage["ancestors"]))
    if lineage and lineage.get("descendants"):
        lines.append("Since: " + ", ".join(f"image {d['image_id']} (job {d['job_id']})" for d in lineage["descendants"][:20]))
    if job.error:
        lines.append(f"Error: {job.error}")
    return clip("\n".join(lines))


def catalog_lines(entries: list[dict[str, Any]], kind: str) -> str:
    """/models and /loras."""
    if not entries:
        return f"No {kind} are installed; an admin lists them in models.toml."
    lines = []
    for entry in entries:
        extras = []
        if entry.get("default"):
            extras.append("default")
        if entry.get("tags"):
            extras.append("tags: " + ", ".join(entry["tags"]))
        if entry.get("triggers"):
            extras.append("trigger words: " + ", ".join(entry["triggers"]))
        extra = f" ({'; '.join(extras)})" if extras else ""
        lines.append(f"**{entry['name']}** [{entry['family']}] {entry.get('description', '')}{extra}")
    return clip("\n".join(lines))


def style_line(view) -> str:
    """One learned style: its name, status and what its evaluation said."""
    accuracy = view.evaluation.get("held_out_accuracy")
    verdict = "active" if view.status == "active" else view.evaluation.get("not_promoted", view.status)
    scored = f", held-out accuracy {accuracy:.2f} (the base: 0.50)" if accuracy is not None else ""
    return (f"**{view.name}** ({view.objective}, {view.steps} steps, {view.liked} 👍 / {view.disliked} 👎{scored}): "
            f"{verdict}.")


def route_example_line(example: dict[str, Any]) -> str:
    """One learned routing example: its number, what it routes to, its weight today, and who chose it."""
    text = example["text"].replace("`", "'")
    return (f"#{example['id']} **{example['target']}** (weight {example['weight']:.2f}, {example['up_votes']} up-vote(s), "
            f"{example['learned_at'][:10]}): `{text}` - {mention(example['chosen_by'])}")


def status(document: dict[str, Any]) -> str:
    """/admin status: the live workers and the queue."""
    eta = f", about {document['eta_s']:.0f} s to clear" if document.get("eta_s") is not None and document["queued"] else ""
    lines = [f"**{len(document['workers'])} worker(s)** alive · {document['queued']} queued · "
             f"{document['running']} running{eta}"]
    for worker in document["workers"]:
        job = f"job {worker['current_job']}" if worker["current_job"] else "idle"
        models = ", ".join(worker["models"]) or "no model loaded"
        lines.append(f"`{worker['host']}` ({worker['device']}, {worker['memory_mb'] or 0:.0f} MiB): {job}; {models}")
    if not document["workers"]:
        lines.append("No worker is running: jobs wait until one starts (`dreamloom serve` or `dreamloom worker`).")
    return clip("\n".join(lines))
