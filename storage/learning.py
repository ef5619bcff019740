"""What the learning loop learns from: images of one base model with verified votes, labelled by the voters.

A community's label for an image is the sign of its verified votes (up minus down); a member's is their own vote.
Images are deduplicated by file hash, and split into training and held-out sets by prompt, so the evaluation asks
about prompts the style never saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import NOT_GALLERY_KINDS, Image, Job, Vote


@dataclass(frozen=True)
class RatedImage:
    """One image with its label (1: liked, 0: disliked) and what made it."""

    image_id: int
    path: str  # relative to the image store
    sha256: str
    prompt: str
    loras: tuple[str, ...]
    label: int
    up: int
    down: int
    voted_at: datetime
    held_out: bool


def _prompt_position(prompt: str) -> float:
    digest = hashlib.sha256(prompt.strip().lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def held_out_prompt(prompt: str, share: float = 0.2) -> bool:
    """Whether a prompt belongs to the held-out split: a stable hash of the text, so a prompt stays on its side
    across runs and its images never straddle the split."""
    return _prompt_position(prompt) < share


def held_out_prompts(labels_by_prompt: dict[str, set[int]], share: float = 0.2) -> set[str]:
    """The held-out prompts: those `held_out_prompt` picks, plus, where they have no liked (or no disliked) image,
    the next prompt by hash that has one, as long as another stays for training. A small community's rare taste
    would otherwise leave nothing to evaluate on."""
    if share <= 0:
        return set()
    held = {prompt for prompt in labels_by_prompt if held_out_prompt(prompt, share)}
    for label in (1, 0):
        if any(label in labels_by_prompt[prompt] for prompt in held):
            continue
        candidates = sorted((p for p in labels_by_prompt if p not in held and label in labels_by_prompt[p]),
                            key=_prompt_position)
        if len(candidates) >= 2:
            held.add(candidates[0])
    return held


async def rated_images(session: AsyncSession, model: str, *, voter: str | None = None,
                       held_out_share: float = 0.2) -> list[RatedImage]:
    """Finished images of `model` with verified votes (only `voter`'s when given), one per distinct file, labelled
    by the sign of their votes; images whose votes cancel out are left out."""
    up = func.coalesce(func.sum(case((Vote.value > 0, 1), else_=0)), 0)
    down = func.coalesce(func.sum(case((Vote.value < 0, 1), else_=0)), 0)
    statement = (select(Image, Job, up.label("up"), down.label("down"), func.max(Vote.created_at).label("at"))
                 .join(Job, Image.job_id == Job.id)
                 .join(Vote, (Vote.image_id == Image.id) & Vote.verified.is_(True))
                 .where(Job.status == "done", Job.model == model, Job.kind.not_in(NOT_GALLERY_KINDS))
                 .group_by(Image.id, Job.id).order_by(Image.id))
    if voter is not None:
        statement = statement.where(Vote.user_id == voter)
    found, seen = [], set()
    for image, job, ups, downs, at in (await session.execute(statement)).all():
        if ups == downs or image.sha256 in seen:
            continue
        seen.add(image.sha256)
        found.append((image, job, int(ups), int(downs), at))
    labels: dict[str, set[int]] = {}
    for _, job, ups, downs, _ in found:
        labels.setdefault(job.prompt, set()).add(int(ups > downs))
    held = held_out_prompts(labels, held_out_share)
    return [RatedImage(image.id, image.path, image.sha256, job.prompt,
                       tuple(str(lora.get("name", "")) for lora in job.loras or []), int(ups > downs), ups, downs, at,
                       job.prompt in held) for image, job, ups, downs, at in found]


async def verified_votes_since(session: AsyncSession, model: str, since: datetime | None) -> int:
    """Verified votes on finished images of `model` cast after `since` (all of them when None): what a scheduled
    learning run waits for."""
    statement = (select(func.count()).select_from(Vote).join(Image, Vote.image_id == Image.id)
                 .join(Job, Image.job_id == Job.id)
                 .where(Vote.verified.is_(True), Job.status == "done", Job.model == model,
                        Job.kind.not_in(NOT_GALLERY_KINDS)))
    if since is not None:
        statement = statement.where(Vote.created_at > since)
    return int(await session.scalar(statement) or 0)
