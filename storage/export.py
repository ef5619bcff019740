"""Dataset export: the community's best images for fine-tuning.

Formats:
- `imagefolder`: Hugging Face's imagefolder (images + metadata.jsonl), what `dreamloom train-lora` reads;
- `kohya`: kohya sd-scripts' DreamBooth layout, `N_trigger class/` folders of images with `.caption` files and a
  `dataset.toml` naming the caption extension (sd-scripts' `--dataset_config`);
- `dpo`: preference pairs as diffusers' Diffusion-DPO script reads them (`caption`, `jpg_0`, `jpg_1`, `label_0`
  in a parquet file that `datasets.load_dataset(folder)` opens);
- `pairs`: the same pairs as JSONL naming PNG files, with their scores, for your own tools.
"""
from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dreamloom.errors import InvalidRequest
from storage.files import ImageStore
from storage.models import NOT_GALLERY_KINDS, Image, Job, JobLora, Vote, utcnow
from storage.ranking import rank_key

FORMATS = ("imagefolder", "kohya", "dpo", "pairs")
KOHYA_CAPTION_EXTENSION = ".caption"  # sd-scripts' default caption extension
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
class KohyaLayout:
    """How a kohya export names its folder: `{repeats}_{trigger} {class_word}/` (sd-scripts' DreamBooth layout:
    the number is how often each image repeats per epoch; the words are the caption of images without one)."""

    trigger: str = "community"
    class_word: str = "style"
    repeats: int = 10

    def folder_name(self) -> str:
        """The subset folder's name; the words must be safe in a file name."""
        for word in (self.trigger, self.class_word):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,39}", word):
                raise InvalidRequest(f"Trigger and class words are letters, digits, spaces, '_' or '-' (up to 40); "
                                     f"got {word!r}.")
        if not 1 <= self.repeats <= 1000:
            raise InvalidRequest(f"Repeats must be from 1 to 1000; got {self.repeats}.")
        return f"{self.repeats}_{self.trigger} {self.class_word}"


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
                 .where(Job.status == "done", Job.kind.not_in(NOT_GALLERY_KINDS)).group_by(Image.id, Job.id))
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
                         filters: ExportFilter, kohya: KohyaLayout = KohyaLayout()) -> ExportReport:
    """Write the selected images in `fmt` into `folder` (new or empty)."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"Export format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
    subset = kohya.folder_name() if fmt == "kohya" else ""
    folder = check_target(folder)
    rows = await scored_images(session, filters)
    folder.mkdir(parents=True, exist_ok=True)

    def copy(row: dict, into: Path) -> str:
        name = f"{row['image'].sha256[:16]}.png"
        shutil.copyfile(store.path(row["image"].path), into / name)
        return name

    if fmt == "imagefolder":
        chosen = [r for r in rows if filters.min_score is None or r["score"] >= filters.min_score]
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for row in chosen:
                metadata.write(json.dumps(_metadata(row, copy(row, folder))) + "\n")
        return ExportReport(folder, fmt, len(chosen))

    if fmt == "kohya":
        chosen = [r for r in rows if filters.min_score is None or r["score"] >= filters.min_score]
        images_dir = folder / subset
        images_dir.mkdir()
        for row in chosen:
            name = copy(row, images_dir)
            caption = f"{kohya.trigger}, {row['job'].prompt}"
            (images_dir / name).with_suffix(KOHYA_CAPTION_EXTENSION).write_text(caption + "\n", encoding="utf-8")
        # sd-scripts' dataset config: `--dataset_config dataset.toml`, or `--train_data_dir .` with
        # `--caption_extension .caption` (its default).
        (folder / "dataset.toml").write_text(
            "[general]\n"
            f'caption_extension = "{KOHYA_CAPTION_EXTENSION}"\n'
            "keep_tokens = 1\n\n"
            "[[datasets]]\n\n"
            "  [[datasets.subsets]]\n"
            f"  image_dir = {json.dumps(subset)}\n"
            f"  num_repeats = {kohya.repeats}\n"
            f"  class_tokens = {json.dumps(f'{kohya.trigger} {kohya.class_word}')}\n", encoding="utf-8")
        return ExportReport(folder, fmt, len(chosen))

    pairs = _preference_pairs(rows, filters.min_score)
    if fmt == "dpo":
        return _write_dpo(folder, store, pairs)
    images_dir = folder / "images"
    images_dir.mkdir()
    written: dict[int, str] = {}
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as out:
        for prompt, model, better, worse in pairs:
            for row in (better, worse):
                if row["image"].id not in written:
                    written[row["image"].id] = "images/" + copy(row, images_dir)
            out.write(json.dumps({"prompt": prompt, "model": model, "chosen": written[better["image"].id],
                                  "rejected": written[worse["image"].id], "chosen_score": better["score"],
                                  "rejected_score": worse["score"]}) + "\n")
    return ExportReport(folder, fmt, len(written), len(pairs))


def _preference_pairs(rows: list[dict], min_score: int | None) -> list[tuple[str, str, dict, dict]]:
    """(prompt, model, better, worse): images of one prompt and model, the better one with the higher score."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["job"].prompt, row["job"].model)].append(row)
    pairs = []
    for (prompt, model), members in groups.items():
        count = 0
        for better in members:
            if min_score is not None and better["score"] < min_score:
                continue
            for worse in members:
                if worse["score"] >= better["score"] or count >= MAX_PAIRS_PER_PROMPT:
                    continue
                pairs.append((prompt, model, better, worse))
                count += 1
    return pairs


DPO_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: validation
    path: data/train-*.parquet
---
# Preference pairs exported by Dreamloom

Columns as diffusers' `train_diffusion_dpo.py` reads them: `caption`, `jpg_0` and `jpg_1` (PNG bytes), `label_0`
(1: `jpg_0` is preferred, 0: `jpg_1` is), and for reference `model`, `score_0`, `score_1`, `image_id_0`, `image_id_1`.
The one file is offered as both `train` and `validation`, because the script reads the `validation` split unless
`--dataset_split_name` says otherwise: `--dataset_name THIS_FOLDER` is all it needs.
"""


def _write_dpo(folder: Path, store: ImageStore, pairs: list[tuple[str, str, dict, dict]]) -> ExportReport:
    """The pairs as one parquet file; which image comes first alternates, so `label_0` holds both values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {name: [] for name in ("caption", "jpg_0", "jpg_1", "label_0", "model", "score_0",
                                                       "score_1", "image_id_0", "image_id_1")}
    images: set[int] = set()
    for index, (prompt, model, better, worse) in enumerate(pairs):
        first, second = (better, worse) if index % 2 == 0 else (worse, better)
        columns["caption"].append(prompt)
        columns["jpg_0"].append(store.path(first["image"].path).read_bytes())
        columns["jpg_1"].append(store.path(second["image"].path).read_bytes())
        columns["label_0"].append(1.0 if first is better else 0.0)
        columns["model"].append(model)
        for suffix, row in (("0", first), ("1", second)):
            columns[f"score_{suffix}"].append(row["score"])
            columns[f"image_id_{suffix}"].append(row["image"].id)
            images.add(row["image"].id)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("model", pa.string()), ("score_0", pa.int64()),
                        ("score_1", pa.int64()), ("image_id_0", pa.int64()), ("image_id_1", pa.int64())])
    (folder / "data").mkdir()
    pq.write_table(pa.table(columns, schema=schema), folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text(DPO_CARD, encoding="utf-8")
    return ExportReport(folder, "dpo", len(images), len(pairs))
