"""Dataset export: the community's best images for fine-tuning.

Formats: `imagefolder` (Hugging Face, with metadata.jsonl), `kohya` (image + caption .txt)
and `pairs` (JSONL preference pairs for Diffusion-DPO: same prompt, higher- vs lower-voted).
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamloom.errors import InvalidRequest
from storage.files import ImageStore
from storage.models import Image, Job, JobLora, Vote, utcnow
from storage.ranking import rank_key

FORMATS = ("imagefolder", "kohya", "pairs")
MAX_PAIRS_PER_PROMPT = 16


@dataclass(frozen=True)
class ExportFilter:
    """Which images to export."""

    min_score: int | None = None
    model: str | None = None
    lora: str | None = None  # only images made with this LoRA (e.g. to train its next version on the favourites)
    since: datetime | None = None
    until: datetime | None = None
    guild_id: str | None = None


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote."""

    folder: Path
    format: str
    images: int
    pairs: int = 0


def check_target(folder: Path) -> Path:
    """The export folder must be a new or empty folder, never a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidRequest(f"{folder} is a file; export into a folder (new or empty).")
    if folder.is_dir() and any(folder.iterdir()):
        raise InvalidRequest(f"{folder} is not empty; export into a new or empty folder.")
    return folder


async def scored_images(session: AsyncSession, filters: ExportFilter) -> list[dict]:
    """Images of finished jobs with their verified votes, best first (the community ranking), one per distinct file."""
    up = func.coalesce(func.sum(case((Vote.value > 0, 1), else_=0)), 0)
    down = func.coalesce(func.sum(case((Vote.value < 0, 1), else_=0)), 0)
    statement = (select(Image, Job, up.label("up"), down.label("down"))
                 .join(Job, Image.job_id == Job.id).outerjoin(Vote, (Vote.image_id == Image.id) & Vote.verified.is_(True))
                 .where(Job.status == "done").group_by(Image.id, Job.id))
    if filters.model:
        statement = statement.where(Job.model == filters.model)
    if filters.lora:
        statement = statement.where(Job.id.in_(select(JobLora.job_id).where(JobLora.name == filters.lora)))
    if filters.guild_id:
        statement = statement.where(Job.guild_id == filters.guild_id)
    if filters.since:
        statement = statement.where(Image.created_at >= filters.since)
    if filters.until:
        statement = statement.where(Image.created_at < filters.until)
    rows = []
    for image, job, ups, downs in (await session.execute(statement)).all():
        rows.append({"image": image, "job": job, "up": int(ups), "down": int(downs), "score": int(ups) - int(downs)})
    now = utcnow()
    rows.sort(key=lambda r: rank_key(r["up"], r["down"], r["image"].created_at, now))
    unique, seen = [], set()
    for row in rows:
        if row["image"].sha256 not in seen:
            seen.add(row["image"].sha256)
            unique.append(row)
    return unique


def _metadata(row: dict, file_name: str) -> dict:
    image, job = row["image"], row["job"]
    return {"file_name": file_name, "text": job.prompt, "negative_prompt": job.negative_prompt, "score": row["score"],
            "up": row["up"], "down": row["down"], "model": job.model, "loras": job.loras or [], "seed": image.seed,
            "width": image.width, "height": image.height, "image_id": image.id, "job_id": job.id, "kind": job.kind,
            "sha256": image.sha256, "created_at": image.created_at.isoformat()}


async def export_dataset(session: AsyncSession, store: ImageStore, folder: Path, fmt: str,
                         filters: ExportFilter) -> ExportReport:
    """Write the selected images in `fmt` into `folder` (new or empty)."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"Export format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
    folder = check_target(folder)
    rows = await scored_images(session, filters)
    folder.mkdir(parents=True, exist_ok=True)

    def copy(row: dict, into: Path) -> str:
        name = f"{row['image'].sha256[:16]}.png"
        shutil.copyfile(store.path(row["image"].path), into / name)
        return name

    if fmt in ("imagefolder", "kohya"):
        chosen = [r for r in rows if filters.min_score is None or r["score"] >= filters.min_score]
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for row in chosen:
                name = copy(row, folder)
                if fmt == "kohya":
                    (folder / name).with_suffix(".txt").write_text(row["job"].prompt + "\n", encoding="utf-8")
                metadata.write(json.dumps(_metadata(row, name)) + "\n")
        if fmt == "kohya":
            (folder / "metadata.jsonl").unlink()
        return ExportReport(folder, fmt, len(chosen))

    # Preference pairs: same prompt and model, the higher-voted image is "chosen".
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["job"].prompt, row["job"].model)].append(row)
    images_dir = folder / "images"
    images_dir.mkdir()
    written: dict[int, str] = {}
    pairs = 0
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as out:
        for (prompt, model), members in groups.items():
            count = 0
            for better in members:
                if filters.min_score is not None and better["score"] < filters.min_score:
                    continue
                for worse in members:
                    if worse["score"] >= better["score"] or count >= MAX_PAIRS_PER_PROMPT:
                        continue
                    for row in (better, worse):
                        if row["image"].id not in written:
                            written[row["image"].id] = "images/" + copy(row, images_dir)
                    out.write(json.dumps({"prompt": prompt, "model": model, "chosen": written[better["image"].id],
                                          "rejected": written[worse["image"].id], "chosen_score": better["score"],
                                          "rejected_score": worse["score"]}) + "\n")
                    count += 1
                    pairs += 1
    return ExportReport(folder, fmt, len(written), pairs)
