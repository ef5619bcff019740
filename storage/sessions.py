"""Web sessions and Discord sign-ins in progress: tokens are stored as SHA-256 hashes only."""
from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from storage.models import SignIn, User, WebSession, utcnow
from storage.queue import ensure_user

SIGN_IN_TTL = timedelta(minutes=10)


def token_hash(token: str) -> str:
    """What the database keeps of a token (a stolen table signs nobody in)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


async def create_session(session: AsyncSession, user_id: str, *, verified: bool, guild_ids: list[str],
                         lifetime: timedelta, display_name: str = "") -> tuple[str, WebSession]:
    """A new session for `user_id`; returns the cookie's token (never stored) and the row."""
    user = await ensure_user(session, user_id)
    if display_name:
        user.display_name = display_name[:200]
    token = secrets.token_urlsafe(32)
    now = utcnow()
    row = WebSession(token_sha256=token_hash(token), user_id=user_id, verified=verified,
                     csrf_token=secrets.token_urlsafe(32), guild_ids=list(guild_ids), created_at=now,
                     expires_at=now + lifetime)
    session.add(row)
    return token, row


async def session_member(connection: AsyncConnection, token: str, now: datetime | None = None):
    """One read for every web request with a cookie: the live session's member (user id, display name, verified,
    CSRF token, server ids), or None (unknown, expired, or a banned member). Takes no write lock."""
    if not token or len(token) > 100:
        return None
    row = (await connection.execute(
        select(WebSession.user_id, User.display_name, WebSession.verified, WebSession.csrf_token, WebSession.guild_ids,
               WebSession.expires_at)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_sha256 == token_hash(token), User.banned.is_(False)))).first()
    if row is None or row.expires_at <= (now or utcnow()):
        return None
    return row


async def end_session(session: AsyncSession, token: str) -> None:
    """Sign out: the token stops working at once."""
    await session.execute(delete(WebSession).where(WebSession.token_sha256 == token_hash(token)))


async def end_sessions_of(session: AsyncSession, user_id: str) -> None:
    """Every session of one member (a ban signs them out everywhere)."""
    await session.execute(delete(WebSession).where(WebSession.user_id == user_id))


async def start_sign_in(session: AsyncSession, state: str, code_verifier: str, return_to: str) -> None:
    """Remember an OAuth2 sign-in under way (its `state` and PKCE verifier); old ones are dropped."""
    now = utcnow()
    await session.execute(delete(SignIn).where(SignIn.created_at < now - SIGN_IN_TTL))
    await session.execute(delete(WebSession).where(WebSession.expires_at < now))
    session.add(SignIn(state_sha256=token_hash(state), code_verifier=code_verifier, return_to=return_to[:300],
                       created_at=now))


async def take_sign_in(session: AsyncSession, state: str) -> SignIn | None:
    """The sign-in a `state` names, used once: a replayed or stale state finds nothing."""
    if not state or len(state) > 100:
        return None
    key = token_hash(state)
    row = await session.get(SignIn, key)
    if row is None:
        return None
    # Deleted by statement, counted: of two callbacks racing with one state, only one finds it.
    taken = await session.execute(delete(SignIn).where(SignIn.state_sha256 == key))
    if taken.rowcount != 1:
        return None
    return row if row.created_at > utcnow() - SIGN_IN_TTL else None
