"""Who may change what on the web: sessions (Sign in with Discord), CSRF tokens, rate limits, client addresses.

Every request that changes state (a vote, a generation, a cancel, signing out) needs a live session and its CSRF
token, in the form field `csrf_token` or the `X-CSRF-Token` header; reading needs neither.
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
import secrets
import time
from contextlib import asynccontextmanager

from aiohttp import web
from limits import parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from dreamloom.errors import InvalidRequest, LimitReached, NotAllowed

from studio.service import Studio
from studio.signin import WebMember

SESSION_COOKIE = "dreamloom_session"
SIGN_IN_COOKIE = "dreamloom_sign_in"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STUDIO = web.AppKey("studio", Studio)
MEMBER = web.RequestKey("member", WebMember)  # absent or None: not signed in


def cookie_options(studio: Studio) -> dict:
    """HttpOnly, SameSite=Lax, and Secure when members reach the gallery over https."""
    return {"httponly": True, "samesite": "Lax", "secure": studio.settings.gallery_url.startswith("https://"),
            "path": "/"}


def member(request: web.Request) -> WebMember | None:
    """The signed-in member (or allowed anonymous visitor) a request comes from, if any."""
    return request.get(MEMBER)


def read_only_reason(studio: Studio) -> str:
    """Why a visitor who is not signed in cannot change anything, and what to do about it."""
    if studio.settings.sign_in_configured:
        return "Sign in with Discord to vote and generate."
    return ("This gallery is read-only on the web: its owner has not set up Sign in with Discord "
            "(DREAMLOOM_DISCORD_CLIENT_ID and _CLIENT_SECRET; see the README, \"Running it in public\").")


def _is_page(request: web.Request) -> bool:
    return not request.path.startswith(("/api/", "/files/", "/thumbs/", "/static/", "/favicon", "/auth/"))


@web.middleware
async def identity(request: web.Request, handler):
    """Looks the session cookie up; where an admin allows anonymous visitors, a page visit gives them a session."""
    studio = request.app[STUDIO]
    token = request.cookies.get(SESSION_COOKIE, "")
    request[MEMBER] = await studio.sign_in.member(token) if token else None
    fresh = None
    if request[MEMBER] is None and studio.settings.web_allow_anonymous and request.method == "GET" and _is_page(request):
        fresh, request[MEMBER] = await studio.sign_in.anonymous_visitor()
    response = await handler(request)
    if fresh and isinstance(response, web.StreamResponse) and not response.prepared:
        response.set_cookie(SESSION_COOKIE, fresh, max_age=86400, **cookie_options(studio))
    return response


@web.middleware
async def csrf(request: web.Request, handler):
    """State changes need a session and its CSRF token; a cross-site request is refused before it is read."""
    if request.method in SAFE_METHODS:
        return await handler(request)
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise NotAllowed("Requests from other sites cannot change anything here.")
    who = member(request)
    if who is None:
        raise NotAllowed(read_only_reason(request.app[STUDIO]))
    sent = request.headers.get("X-CSRF-Token")
    if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        sent = (await read_form(request)).get("csrf_token")
    if not isinstance(sent, str) or not secrets.compare_digest(sent.encode(), who.csrf_token.encode()):
        raise NotAllowed("This request carries no valid CSRF token; reload the page and try again.")
    return await handler(request)


async def read_form(request: web.Request):
    """The request's form, read within the body timeout (a client trickling its body is cut off); a body that is
    not a readable form (a broken multipart, bad encoding) is a 400, never a 500."""
    async with _body_deadline(request):
        try:
            return await request.post()
        except web.HTTPException:
            raise  # too large (413): aiohttp's own answer
        except Exception as error:  # aiohttp's multipart parser raises several types for malformed bodies
            raise InvalidRequest("The form could not be read; send it as a normal HTML form.") from error


async def read_json(request: web.Request):
    """The request's JSON body within the body timeout; None when it is not JSON."""
    async with _body_deadline(request):
        try:
            return await request.json()
        except ValueError:  # not JSON, or not UTF-8
            return None


@asynccontextmanager
async def _body_deadline(request: web.Request):
    """A request body must arrive within `web_body_timeout_s`; past it the answer is 408."""
    try:
        async with asyncio.timeout(request.app[STUDIO].settings.web_body_timeout_s):
            yield
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="The request body took too long to arrive.") from None


def client_address(request: web.Request) -> str:
    """The client's address: the peer's, or, when the peer is a configured trusted proxy, the last address in
    X-Forwarded-For that is not itself a trusted proxy."""
    peer = request.remote or "unknown"
    networks = _trusted(request.app[STUDIO].settings.trusted_proxies)
    if not networks or not _within(peer, networks):
        return peer
    hops = [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, networks):
            return hop[:64]
    return peer


def address_within(address: str, entries: list[str]) -> bool:
    """Whether `address` lies in one of the networks `entries` names (e.g. who may read /metrics)."""
    return _within(address, _trusted(entries))


def _trusted(entries: list[str]) -> tuple:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _within(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


class RateLimits:
    """Moving-window limits per member and per client address (in this process's memory: a web process counts
    its own requests; the per-member vote cap, which must hold across processes, is in the database)."""

    def __init__(self, settings) -> None:
        self.window = MovingWindowRateLimiter(MemoryStorage())
        self.per_member = {"imagine": parse_many(settings.web_rate_imagine), "vote": parse_many(settings.web_rate_votes),
                           "events": parse_many(settings.web_rate_events)}
        self.per_address = parse_many(settings.web_rate_per_address)

    async def hit(self, request: web.Request, action: str, what: str) -> None:
        """Count one `action`; past a limit raise LimitReached (429, with Retry-After)."""
        who, address = member(request), client_address(request)
        checks = [(item, f"{action}:member", who.user_id if who else f"address:{address}")
                  for item in self.per_member[action]]
        checks += [(item, "address", address) for item in self.per_address]
        for item, namespace, key in checks:
            if not await self.window.test(item, namespace, key):
                stats = await self.window.get_window_stats(item, namespace, key)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise LimitReached(f"Too many {what} ({item.amount} per {_period(item)}); try again in {wait} s.",
                                   retry_after=wait)
        for item, namespace, key in checks:
            await self.window.hit(item, namespace, key)


def _period(item) -> str:
    return item.GRANULARITY.name if item.multiples == 1 else f"{item.multiples} {item.GRANULARITY.name}s"


LIMITS = web.AppKey("limits", RateLimits)
