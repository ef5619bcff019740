"""Sign in with Discord: the OAuth2 authorization-code flow with PKCE (RFC 7636), scopes `identify guilds`.

The studio keeps the `state` and the PKCE verifier in the database (`storage.sessions`), so a sign-in started
on one process can finish on another; this module only speaks HTTP to Discord.
"""
from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

from dreamloom.errors import NotAllowed

SCOPES = "identify guilds"
CALLBACK_PATH = "/auth/discord/callback"


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
