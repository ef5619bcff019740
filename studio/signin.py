"""The web's members: Sign in with Discord (the OAuth2 authorization-code flow with PKCE, RFC 7636, scopes
`identify guilds`) and the sessions it opens.

The `state` and the PKCE verifier live in the database (`storage.sessions`), so a sign-in started on one process
can finish on another.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlencode

import aiohttp

from dreamloom.errors import NotAllowed
from storage import queue, sessions
from storage.database import Database, uninterrupted

SCOPES = "identify guilds"
CALLBACK_PATH = "/auth/discord/callback"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebMember:
    """Who a web request comes from: a member signed in with Discord (`verified`), or an anonymous visitor where
    an admin allows them."""

    user_id: str
    display_name: str
    verified: bool
    csrf_token: str
    guild_ids: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class DiscordAccount:
    """What Discord told us about the person who signed in."""

    id: str
    name: str
    guild_ids: tuple[str, ...]


def new_pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)[:96]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_url(settings, state: str, challenge: str) -> str:
    """Where the browser goes to approve the sign-in on Discord."""
    query = {"response_type": "code", "client_id": settings.discord_client_id, "scope": SCOPES, "state": state,
             "redirect_uri": redirect_uri(settings), "code_challenge": challenge, "code_challenge_method": "S256",
             "prompt": "none"}
    return f"{settings.discord_oauth_url}?{urlencode(query)}"


def redirect_uri(settings) -> str:
    """The callback URL registered in the Discord developer portal."""
    return settings.gallery_url + CALLBACK_PATH


async def fetch_account(settings, code: str, verifier: str) -> DiscordAccount:
    """Trade the authorization code (with the PKCE verifier) for a token, then read the account and its servers."""
    api = settings.discord_api_base.rstrip("/")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri(settings),
            "code_verifier": verifier}
    auth = aiohttp.BasicAuth(settings.discord_client_id, settings.discord_client_secret)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            async with http.post(f"{api}/oauth2/token", data=form, auth=auth) as response:
                if response.status != 200:
                    raise NotAllowed("Discord did not accept this sign-in (it may have expired); sign in again.")
                token = (await response.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{api}/users/@me", headers=headers) as response:
                response.raise_for_status()
                user = await response.json()
            async with http.get(f"{api}/users/@me/guilds", headers=headers) as response:
                response.raise_for_status()
                guilds = await response.json()
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError) as error:
        raise NotAllowed("Discord could not be reached to finish signing in; try again in a moment.") from error
    name = str(user.get("global_name") or user.get("username") or "")
    return DiscordAccount(str(user["id"]), name[:200], tuple(str(g["id"]) for g in guilds if isinstance(g, dict)))


class SignIn:
    """Sign-ins, web sessions and anonymous visitors over the database."""

    def __init__(self, db: Database, settings) -> None:
        self.db = db
        self.settings = settings

    @uninterrupted
    async def begin(self, return_to: str = "/") -> tuple[str, str]:
        """Start Sign in with Discord: returns the `state` (the browser keeps it in a cookie too) and the URL of
        Discord's approval page."""
        if not self.settings.sign_in_configured:
            raise NotAllowed("Sign-in is not set up here: the owner sets DREAMLOOM_DISCORD_CLIENT_ID and "
                             "DREAMLOOM_DISCORD_CLIENT_SECRET (see the README, \"Running it in public\").")
        if not re.fullmatch(r"/(?![/\\])[!-~]{0,299}", return_to) or "\\" in return_to:
            # Only pages of this site, in printable ASCII: never an open redirect ("//x", "/\\x", or "/\t/x",
            # which browsers read as "//x").
            return_to = "/"
        state = secrets.token_urlsafe(32)
        verifier, challenge = new_pkce_pair()
        async with self.db.session() as session:
            await sessions.start_sign_in(session, state, verifier, return_to)
        return state, authorize_url(self.settings, state, challenge)

    @uninterrupted
    async def finish(self, state: str, code: str) -> tuple[str, str]:
        """Finish a sign-in Discord approved: returns the new session's token (for the cookie) and the page to
        go back to. A state used before, stale or unknown, or a member the settings do not admit, is refused."""
        async with self.db.session() as session:
            pending = await sessions.take_sign_in(session, state)
        if pending is None:
            raise NotAllowed("This sign-in link has expired or was already used; sign in again.")
        account = await fetch_account(self.settings, code, pending.code_verifier)
        allowed = self.settings.signin_guild_ids
        if allowed and not set(allowed) & set(account.guild_ids):
            raise NotAllowed("Only members of this community's Discord server can sign in here; join it first.")
        user_id = f"discord:{account.id}"
        lifetime = timedelta(days=self.settings.web_session_days)
        async with self.db.session() as session:
            if (await queue.ensure_user(session, user_id)).banned:
                raise NotAllowed("You are banned from this studio; ask a server admin.")
            token, _ = await sessions.create_session(session, user_id, verified=True, guild_ids=list(account.guild_ids),
                                                     lifetime=lifetime, display_name=account.name)
        log.info("%s signed in on the web", user_id)
        return token, pending.return_to

    @uninterrupted
    async def anonymous_visitor(self) -> tuple[str, WebMember]:
        """A session for a visitor who is not signed in (only where `web_allow_anonymous` is set): their votes are
        kept apart (unverified)."""
        if not self.settings.web_allow_anonymous:
            raise NotAllowed("Sign in with Discord to do this.")
        async with self.db.session() as session:
            token, row = await sessions.create_session(session, f"web:{secrets.token_hex(8)}", verified=False,
                                                       guild_ids=[], lifetime=timedelta(days=1))
            return token, WebMember(row.user_id, "", False, row.csrf_token)

    @uninterrupted
    async def member(self, token: str) -> WebMember | None:
        """Who a session cookie belongs to (None: no live session, or a banned member)."""
        async with self.db.reading() as connection:
            row = await sessions.session_member(connection, token)
        if row is None:
            return None
        return WebMember(row.user_id, row.display_name, bool(row.verified), row.csrf_token, tuple(row.guild_ids or ()))

    @uninterrupted
    async def sign_out(self, token: str) -> None:
        """End a web session (its cookie stops working at once)."""
        async with self.db.session() as session:
            await sessions.end_session(session, token)
