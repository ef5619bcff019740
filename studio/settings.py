"""The one typed settings object: a TOML file plus `DREAMLOOM_*` environment variables.

Precedence: explicit arguments > environment variables > the TOML file
(`DREAMLOOM_CONFIG`, else `dreamloom.toml` in the working directory) > defaults.
"""
from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from dreamloom.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_registry() -> Path:
    """The checkout's `models.toml`; in an installed package (no checkout), the starter registry it ships."""
    checkout = PROJECT_ROOT / "models.toml"
    if checkout.is_file():
        return checkout
    from dreamloom.starter import STARTER_REGISTRY

    return STARTER_REGISTRY


class Settings(BaseSettings):
    """Dreamloom's settings; every field can be set as `DREAMLOOM_<FIELD>` or in the TOML file."""

    model_config = SettingsConfigDict(env_prefix="DREAMLOOM_", extra="forbid")
    # DISCORD_TOKEN (unprefixed, as Discord's docs call it) is read too; see load_settings.

    data_dir: Path = Field(Path("data"), description="Where the database, images, outputs and caches live.")
    registry: Path = Field(default_factory=default_registry,
                           description="The model registry (models.toml); default the checkout's, else the starter one.")
    device: str | None = Field(None, description="Torch device: cpu, cuda or cuda:N; default CUDA when available.")
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads torch uses in this process (default: torch's own, all cores); "
        "pin it when several workers share a machine.")
    model_memory_budget_mb: int | None = Field(
        None, ge=1, description="Memory for loaded models (GPU memory on a GPU, RAM on CPU); default 90% / 50%."
    )

    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql+asyncpg://user:pass@host/db); default SQLite in data_dir."
    )
    max_queued_per_user: int = Field(10, ge=1, description="Jobs a user may have waiting in the queue at once.")
    daily_quota: int | None = Field(None, ge=1, description="Jobs a user may submit per 24 hours (none: unlimited).")
    lease_seconds: float = Field(30.0, gt=1, description="A running job's lease; renewed while it runs.")
    max_attempts: int = Field(3, ge=1, description="Runs of a job before it is marked failed.")

    gallery_host: str = Field("127.0.0.1", description="Address the web gallery listens on (loopback by default).")
    gallery_port: int = Field(8765, ge=0, le=65535, description="Port of the web gallery (0: do not serve it).")
    gallery_show_nsfw: bool = Field(False, description="Show images from models tagged `nsfw` in the gallery.")
    gallery_public_url: str | None = Field(
        None, description="Older name of public_url (still read when public_url is not set)."
    )
    public_url: str | None = Field(
        None, description="The gallery's address as members reach it (https://... behind a proxy): links in Discord, "
        "the sign-in redirect URL, Secure cookies when https; default http://host:port."
    )
    discord_client_id: str | None = Field(
        None, description="The Discord application's client id (OAuth2): with the secret, enables Sign in with Discord."
    )
    discord_client_secret: str | None = Field(None, description="The Discord application's client secret (OAuth2).")
    discord_oauth_url: str = Field(
        "https://discord.com/oauth2/authorize", description="Discord's OAuth2 authorization page (any compatible one)."
    )
    signin_guild_ids: list[str] = Field(
        default_factory=list, description="Discord servers whose members may sign in on the web (empty: any "
        "Discord account may sign in)."
    )
    web_session_days: float = Field(30, gt=0, description="How long a web sign-in lasts.")
    web_allow_anonymous: bool = Field(
        False, description="Let visitors who are not signed in vote and generate; their votes are kept apart and "
        "never count for ranking, the starboard or the export."
    )
    max_votes_per_minute: int = Field(
        60, ge=1, description="Votes one member may cast per minute (any front door; a vote on a grid counts 4).")
    web_rate_imagine: str = Field("6/minute;60/hour", description="Web generations per member (limits syntax).")
    web_rate_votes: str = Field("60/minute", description="Web votes per member (limits syntax).")
    web_rate_events: str = Field("60/minute", description="Live progress streams opened per member or visitor.")
    web_rate_per_address: str = Field(
        "120/minute", description="Requests that change state or open a stream, per client address (all members)."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Addresses (or networks, 10.0.0.0/8) of reverse proxies whose "
        "X-Forwarded-For names the client; from any other peer the header is ignored."
    )
    web_idle_timeout_s: float = Field(
        15.0, gt=0, description="A connection that sends no complete request headers for this long is closed "
        "(silent and slow clients alike)."
    )
    web_body_timeout_s: float = Field(15.0, gt=0, description="Time a client has to send a request's body.")

    discord_token: str | None = Field(None, description="The Discord bot token; the bot runs only when it is set.")
    discord_shards: int | None = Field(
        None, ge=1, le=10_000, description="Gateway shards the bot runs; default: as many as Discord recommends (one "
        "below 2 500 servers; Discord requires sharding past that).")
    discord_api_base: str = Field("https://discord.com/api/v10", description="Discord's REST base (any compatible API).")
    discord_gateway_url: str = Field("wss://gateway.discord.gg/", description="Discord's gateway websocket URL.")
    discord_upload_limit_mb: float = Field(10.0, gt=0, description="Largest file the bot uploads; bigger results are re-encoded.")
    discord_progress_interval_s: float = Field(
        2.0, ge=0.05, description="Least time between two progress edits of one message (Discord rate limits edits)."
    )
    learn_slice_seconds: float = Field(
        10.0, gt=0, description="Longest stretch of training between two waiting generations (a learning job "
        "checkpoints, then lets waiting generations run for as long again, then trains on).")
    learn_steps: int = Field(400, ge=1, le=100_000, description="Training steps of a learned style (house or --p).")
    learn_every: str | None = Field(
        None, description="Learn each base model's house style again on this interval (e.g. 7d, 12h; none: only "
        "when an admin asks).")
    learn_min_new_votes: int = Field(
        50, ge=1, description="Verified votes since the last version a scheduled learning run needs.")
    route_learning: bool = Field(
        True, description="Learn routing examples from members' explicit choices (--model, --niji, <lora:...>) whose "
        "results other verified members up-voted.")
    route_learn_min_upvotes: int = Field(
        1, ge=1, description="Verified up-votes from members other than its author a job needs before its prompt "
        "becomes a routing example.")
    route_examples_max: int = Field(
        10_000, ge=0, le=1_000_000, description="Learned routing examples kept per server; past it the oldest go.")
    route_example_half_life_days: float = Field(
        90.0, gt=0, description="Age at which a learned routing example counts half; below a quarter it stops counting.")
    metrics_networks: list[str] = Field(
        ["127.0.0.1/32", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
        description="Addresses allowed to read /metrics (a JSON list of networks): the loopback and private networks, "
        "where a Prometheus server lives, by default; others get 404.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="`dreamloom worker` serves its own Prometheus metrics on this port (0: not).")
    result_cache: bool = Field(
        True, description="Answer a request identical to one already made (same model and LoRA files, every parameter, "
        "the seed) from the image store at once, without the GPU.")
    embedding_cache_size: int = Field(
        256, ge=0, le=100_000, description="Prompt embeddings kept per worker (LRU, per model and text encoder); 0 turns "
        "the embedding cache off.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("DREAMLOOM_CONFIG", "dreamloom.toml"))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

    @field_validator("learn_every")
    @classmethod
    def _interval(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_interval(value)
            return value.strip()
        return None

    @property
    def learn_interval(self) -> timedelta | None:
        """`learn_every` as a duration (None: no schedule)."""
        return parse_interval(self.learn_every) if self.learn_every else None

    @property
    def gallery_url(self) -> str:
        """Where links to image pages point."""
        return (self.public_url or self.gallery_public_url or f"http://{self.gallery_host}:{self.gallery_port}").rstrip("/")

    @property
    def sign_in_configured(self) -> bool:
        """Whether Sign in with Discord is set up (client id and secret)."""
        return bool(self.discord_client_id and self.discord_client_secret)

    @property
    def outputs_dir(self) -> Path:
        """Where CLI generations are written."""
        return self.data_dir / "outputs"

    @property
    def images_dir(self) -> Path:
        """The content-addressed image store."""
        return self.data_dir / "images"

    @property
    def cache_dir(self) -> Path:
        """Derived files (e.g. single-file model configs)."""
        return self.data_dir / "cache"


def parse_interval(text: str) -> timedelta:
    """`7d`, `12h`, `30m` or `90s` (a number and a unit) as a duration."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms])\s*", text or "")
    if not match or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not an interval: a number and d, h, m or s, e.g. 7d")
    return timedelta(**{{"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match[2]]: float(match[1])})


def load_settings(**overrides) -> Settings:
    """Settings from the environment and TOML file; invalid values raise `ConfigError` naming the field."""
    config = os.environ.get("DREAMLOOM_CONFIG")
    if config and not Path(config).is_file():
        raise ConfigError(f"DREAMLOOM_CONFIG points to {config}, which does not exist.")
    if os.environ.get("DISCORD_TOKEN") and not os.environ.get("DREAMLOOM_DISCORD_TOKEN"):
        overrides.setdefault("discord_token", os.environ["DISCORD_TOKEN"])
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"Invalid settings: {problems}.") from None
    except Exception as error:  # a malformed TOML file
        raise ConfigError(f"Could not read the settings file: {error}.") from None
