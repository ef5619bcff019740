"""The data model (typed SQLAlchemy 2 models). Migrations in `storage/migrations` create exactly this."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text)
from sqlalchemy.sql.expression import true as sa_true
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_KINDS = ("imagine", "upscale", "vary", "reroll", "learn", "compare")
NOT_GALLERY_KINDS = ("compare",)  # comparison boards: for the admin who asked, not the gallery, exports or learning
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the storage layer uses."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database (SQLite hands back naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class User(Base):
    """A member, from any front door: ids look like `discord:1234`, `cli:alice`, `web:5f2c`."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    defaults: Mapped[dict[str, Any]] = mapped_column(default=dict)  # /settings: default parameters
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    daily_quota: Mapped[int | None] = mapped_column(Integer, default=None)
    # Fair queue bookkeeping: who was served least recently goes first.
    queued_count: Mapped[int] = mapped_column(Integer, default=0)
    last_served_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_users_fair", "queued_count", "last_served_at"),)


class Guild(Base):
    """A Discord server (or `local` for the CLI and web) and its settings."""

    __tablename__ = "guilds"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # gallery channel, vote threshold, banned words...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One request to the engine, from submission to its images."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    guild_id: Mapped[str | None] = mapped_column(String(100), default=None)
    channel_id: Mapped[str | None] = mapped_column(String(100), default=None)
    message_id: Mapped[str | None] = mapped_column(String(100), default=None)
    parent_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", use_alter=True, name="fk_jobs_parent_image_id"), default=None)
    raw_prompt: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text, default="")
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the parsed prompt
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # what the engine used
    model: Mapped[str | None] = mapped_column(String(200), default=None)
    loras: Mapped[list[Any]] = mapped_column(default=list)
    route_reason: Mapped[str | None] = mapped_column(Text, default=None)
    seed: Mapped[int | None] = mapped_column(BigInteger, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(100), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # What determines the pictures (model and LoRA file hashes, every parameter, the seed): an identical request
    # is answered from the job that made them (`cached_from_job_id`), without the GPU.
    result_key: Mapped[str | None] = mapped_column(String(64), default=None)
    cached_from_job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    # Times this job, the fair next one, was passed over for a job on a model a worker had loaded (bounded).
    affinity_skips: Mapped[int] = mapped_column(Integer, default=0)

    images: Mapped[list[Image]] = relationship(back_populates="job", foreign_keys="Image.job_id",
                                               order_by="Image.index_in_job", lazy="raise")

    __table_args__ = (
        CheckConstraint(f"kind IN {JOB_KINDS}", name="ck_jobs_kind"),
        CheckConstraint(f"status IN {JOB_STATUSES}", name="ck_jobs_status"),
        Index("ix_jobs_status_priority", "status", "priority", "id"),
        Index("ix_jobs_user_status", "user_id", "status", "id"),
        Index("ix_jobs_lease", "status", "lease_expires_at"),
        Index("ix_jobs_message", "message_id"),
        Index("ix_jobs_result_key", "result_key", "status"),
    )


class JobLora(Base):
    """A LoRA a job used, one row per name: the per-LoRA gallery filters on it (`jobs.loras` keeps the weights)."""

    __tablename__ = "job_loras"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)

    __table_args__ = (Index("ix_job_loras_name", "name", "job_id"),)


class Image(Base):
    """One generated image; `parent_image_id` links upscales and variations to their source."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    index_in_job: Mapped[int] = mapped_column(Integer)  # 1..4
    parent_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(300))  # relative to the image store
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Denormalised from `votes` in the same transaction as each vote, so ranking is an index scan.
    up_votes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    down_votes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    score: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # Wilson lower bound
    # Set once when the image is reposted to its guild's gallery channel (the starboard); "pending" while posting.
    starboard_message_id: Mapped[str | None] = mapped_column(String(100), default=None)

    job: Mapped[Job] = relationship(back_populates="images", foreign_keys=[job_id], lazy="raise")

    __table_args__ = (Index("uq_images_job_index", "job_id", "index_in_job", unique=True),
                      Index("ix_images_parent", "parent_image_id"),
                      Index("ix_images_score", "score", "id"),
                      Index("ix_images_created", "created_at"))


class Vote(Base):
    """A community vote: one per user and image."""

    __tablename__ = "votes"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="cli")
    # A Discord member (bot or signed-in web visitor) or the owner's CLI; anonymous web votes (when an admin allows
    # them) are kept but never counted for ranking, the starboard or the export.
    verified: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint("value IN (-1, 1)", name="ck_votes_value"), Index("ix_votes_image", "image_id"),
                      Index("ix_votes_user_created", "user_id", "created_at"))


class Favourite(Base):
    """An image in a user's private collection."""

    __tablename__ = "favourites"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A signed-in web visitor (or, where an admin allows it, an anonymous one): the cookie holds a random token,
    the table only its SHA-256, so a leaked database signs nobody in."""

    __tablename__ = "web_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    verified: Mapped[bool] = mapped_column(Boolean, default=False)  # signed in with Discord
    csrf_token: Mapped[str] = mapped_column(String(64))
    guild_ids: Mapped[list[Any]] = mapped_column(default=list)  # the Discord servers the member belongs to
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()

    __table_args__ = (Index("ix_web_sessions_user", "user_id"), Index("ix_web_sessions_expires", "expires_at"))


class SignIn(Base):
    """A Discord sign-in under way: the OAuth2 `state` (hashed) and the PKCE verifier, for ten minutes."""

    __tablename__ = "sign_ins"

    state_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    code_verifier: Mapped[str] = mapped_column(String(128))
    return_to: Mapped[str] = mapped_column(String(300), default="/")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LearnedStyle(Base):
    """A LoRA the studio learned from votes: a base model's house style (the community's) or one member's
    personal style (`--p`), versioned, with the data it learned from and its evaluation. At most one version per
    (kind, base model, owner) is active; the others are kept as candidates or retired."""

    __tablename__ = "learned_styles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(160), unique=True)  # house-starter-shapes-v3, p-discord-1234-v2
    kind: Mapped[str] = mapped_column(String(16))  # house | personal
    base_model: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[str | None] = mapped_column(String(100), default=None)  # the member of a personal style
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(300))  # the LoRA file, relative to the data directory
    objective: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float, default=1.0)  # the weight --stylize 100 applies
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # candidate | active | retired
    liked: Mapped[int] = mapped_column(Integer, default=0)
    disliked: Mapped[int] = mapped_column(Integer, default=0)
    votes_from: Mapped[datetime | None] = mapped_column(default=None)
    votes_to: Mapped[datetime | None] = mapped_column(default=None)
    evaluation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_learned_styles_lookup", "kind", "base_model", "owner_id", "status"),)


class RouteExampleRow(Base):
    """A prompt a server's router learned from: a member chose a model or LoRA for it themselves (`--model`,
    `--niji`, `<lora:...>`) and verified members liked the result. Per server (`scope`: the guild id, or "" for the
    web and the CLI), bounded, decaying by age (`learned_at`), removable."""

    __tablename__ = "route_examples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(100), default="")
    text: Mapped[str] = mapped_column(String(300))
    target: Mapped[str] = mapped_column(String(200))  # a registered model or LoRA name
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32, unit length (engine.routing.example_vector)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    chosen_by: Mapped[str] = mapped_column(String(100))
    up_votes: Mapped[int] = mapped_column(Integer, default=0)  # verified up-votes from others when it was learned
    learned_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("uq_route_examples", "scope", "target", "text", unique=True),
                      Index("ix_route_examples_scope_learned", "scope", "learned_at"))


class WorkerRow(Base):
    """A worker process that is alive: it writes its heartbeat every few seconds (what `dreamloom status` and
    `/admin status` show); a row whose heartbeat stopped is a dead worker, whose job its lease gives back."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)  # host:pid:start, as in jobs.lease_owner
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(50))
    models: Mapped[list[Any]] = mapped_column(default=list)  # loaded, least recently used first
    current_job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    memory_mb: Mapped[float | None] = mapped_column(Float, default=None)  # GPU memory allocated, else the process's RSS
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobPreview(Base):
    """The latest preview of a running job, for front doors in other processes (a PostgreSQL notification names
    the job and step; the picture is read from here). Replaced at each preview; gone with its job."""

    __tablename__ = "job_previews"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
