"""A local Discord API double: the parts of Discord's REST API and gateway websocket the bot uses.

The real discord.py client connects to it (`DREAMLOOM_DISCORD_API_BASE` / `DREAMLOOM_DISCORD_GATEWAY_URL`).
Tests act as members by sending gateway events (slash commands, button clicks, reactions) and assert on the
REST requests the bot made and the messages and files it left. Faults can be injected: 429 with retry-after,
5xx, a dropped gateway connection, expired interaction tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

ADMIN = str((1 << 41) - 1)  # every permission bit
MEMBER = str((1 << 10) | (1 << 11) | (1 << 31))  # view channel, send messages, use application commands


@dataclass
class Recorded:
    """One REST request the bot made."""

    method: str
    path: str
    json: Any
    files: dict[str, tuple[str, bytes]]
    status: int
    at: float


@dataclass
class Fault:
    """Answer matching requests with an error `times` times."""

    method: str
    pattern: re.Pattern
    status: int
    times: int
    retry_after: float = 0.05
    is_global: bool = False


@dataclass
class Member:
    """A member the tests act as."""

    id: str
    name: str
    permissions: str = MEMBER

    def user(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.name, "discriminator": "0", "global_name": self.name, "avatar": None}

    def member(self) -> dict[str, Any]:
        return {"user": self.user(), "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0,
                "permissions": self.permissions, "nick": None, "avatar": None, "pending": False}


@dataclass
class Interaction:
    """An interaction the double sent, and what the bot answered."""

    id: str
    token: str
    channel_id: str
    user: Member
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original_id: str | None = None
    sent_at: float = 0.0
    acknowledged_at: float | None = None
    expired: bool = False
    source_message_id: str | None = None  # the message whose button was pressed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class DiscordDouble:
    """An aiohttp server on 127.0.0.1 speaking Discord's REST v10 and gateway protocols (JSON, no compression)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1_100_000_000_000_000_000)
        self.app_id = self.snowflake()
        self.bot_user = {"id": self.app_id, "username": "Dreamloom", "discriminator": "0", "avatar": None, "bot": True,
                         "global_name": None, "flags": 0, "verified": True, "mfa_enabled": False}
        self.guild_id = self.snowflake()
        self.channel_id = self.snowflake()  # #art
        self.nsfw_channel_id = self.snowflake()  # #after-dark, age-restricted
        self.gallery_channel_id = self.snowflake()  # #gallery
        self.channels = {
            self.channel_id: {"name": "art", "nsfw": False},
            self.nsfw_channel_id: {"name": "after-dark", "nsfw": True},
            self.gallery_channel_id: {"name": "gallery", "nsfw": False},
        }
        self.messages: dict[str, dict[str, Any]] = {}
        self.files: dict[str, tuple[str, bytes, str]] = {}  # attachment id -> (filename, bytes, content type)
        self.interactions: dict[str, Interaction] = {}  # by token
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.commands: list[dict[str, Any]] = []
        self.autocomplete: dict[str, list[dict[str, Any]]] = {}
        self.identifies = 0
        self.resumes = 0
        self._ws: web.WebSocketResponse | None = None  # the gateway connection of the test server's shard
        self.shard_count = 1  # what GET /gateway/bot recommends
        self.identified_shards: list[list[int]] = []
        self._session_id: str | None = None
        self._seq = 0
        self._history: list[dict[str, Any]] = []
        self._connected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        # OAuth2 (Sign in with Discord): one application, the accounts that can sign in, codes and tokens issued.
        self.client_id = self.app_id
        self.client_secret = "double-client-secret"
        self.redirect_uris: list[str] = []  # as registered in the developer portal
        self.accounts: dict[str, tuple[Member, list[str]]] = {}  # user id -> (member, the guild ids they are in)
        self._codes: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, str] = {}  # access token -> user id
        self.token_requests: list[dict[str, Any]] = []

    def snowflake(self) -> str:
        return str(next(self._ids))

    # -- server ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{id}/{filename}", self._download)
        app.router.add_get("/oauth2/authorize", self._authorize_page)
        app.router.add_post("/oauth2/authorize", self._authorize)
        app.router.add_post("/api/v10/oauth2/token", self._token)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def oauth_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/authorize"

    # -- OAuth2: the authorization-code flow with PKCE, as Discord's docs describe it ----------------------

    def add_account(self, member: Member, guild_ids: list[str] | None = None) -> None:
        """Someone who can sign in with Discord (a member of `guild_ids`, default the test server)."""
        self.accounts[member.id] = (member, [self.guild_id] if guild_ids is None else list(guild_ids))

    def _oauth_error(self, message: str) -> web.Response:
        return web.Response(status=400, text=f"OAuth2 error: {message}")

    def _check_authorize(self, query) -> str | None:
        if query.get("client_id") != self.client_id:
            return "unknown client_id"
        if query.get("redirect_uri") not in self.redirect_uris:
            return "redirect_uri is not registered"
        if query.get("response_type") != "code" or set(query.get("scope", "").split()) != {"identify", "guilds"}:
            return "response_type must be code and scope identify guilds"
        if query.get("code_challenge_method") != "S256" or len(query.get("code_challenge", "")) < 43:
            return "PKCE S256 code_challenge required"
        return None

    async def _authorize_page(self, request: web.Request) -> web.Response:
        """Discord's consent screen: one Authorize button per account (as if that person were logged in)."""
        problem = self._check_authorize(request.query)
        if problem:
            return self._oauth_error(problem)
        from html import escape

        hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in request.query.items())
        buttons = "".join(f'<button name="user_id" value="{m.id}">Authorize as {escape(m.name)}</button>'
                          for m, _ in self.accounts.values())
        return web.Response(content_type="text/html", text=(
            f'<!doctype html><title>Discord</title><h1>Dreamloom wants to access your account</h1>'
            f'<form method="post">{hidden}{buttons}<button name="deny" value="1">Cancel</button></form>'))

    async def _authorize(self, request: web.Request) -> web.Response:
        form = await request.post()
        problem = self._check_authorize(form)
        if problem:
            return self._oauth_error(problem)
        from urllib.parse import urlencode

        if form.get("deny"):
            raise web.HTTPFound(f"{form['redirect_uri']}?" + urlencode({"error": "access_denied", "state": form["state"]}))
        code = self.snowflake()
        self._codes[code] = {"user_id": form["user_id"], "challenge": form["code_challenge"],
                             "redirect_uri": form["redirect_uri"]}
        raise web.HTTPFound(f"{form['redirect_uri']}?" + urlencode({"code": code, "state": form["state"]}))

    async def _token(self, request: web.Request) -> web.Response:
        import base64
        import hashlib

        form = dict(await request.post())
        self.token_requests.append(form)
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return self._json({"error": "invalid_client"}, 401)
        grant = self._codes.pop(str(form.get("code")), None)  # a code works once
        if grant is None or form.get("grant_type") != "authorization_code" or form.get("redirect_uri") != grant["redirect_uri"]:
            return self._json({"error": "invalid_grant"}, 400)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["challenge"]:
            return self._json({"error": "invalid_grant", "error_description": "code_verifier mismatch"}, 400)
        token = self.snowflake() + "access"
        self._tokens[token] = grant["user_id"]
        return self._json({"access_token": token, "token_type": "Bearer", "expires_in": 604800,
                           "refresh_token": "unused", "scope": "identify guilds"})

    def _bearer_user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        return self._tokens.get(header[7:]) if header.startswith("Bearer ") else None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- gateway --------------------------------------------------------------------------------------

    def guild_shard(self) -> int:
        """The shard the test server belongs to (Discord's rule: (guild_id >> 22) % shard count)."""
        return (int(self.guild_id) >> 22) % self.shard_count

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        owner = False  # whether this connection is the shard that holds the test server (it gets its events)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            payload = json.loads(message.data)
            op, data = payload.get("op"), payload.get("d")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
            elif op == 2:
                self.identifies += 1
                shard = list(data.get("shard") or [0, 1])
                self.identified_shards.append(shard)
                ready = {"v": 10, "user": self.bot_user, "guilds": [], "session_id": self.snowflake(),
                         "resume_gateway_url": self.gateway_url, "shard": shard,
                         "application": {"id": self.app_id, "flags": 0}, "private_channels": [], "relationships": []}
                if shard[0] != self.guild_shard():  # a shard without the test server: READY, then only heartbeats
                    await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}))
                    continue
                owner, self._ws = True, ws
                self._session_id, self._seq, self._history = ready["session_id"], 0, []
                await self._send_event("READY", ready | {"guilds": [{"id": self.guild_id, "unavailable": True}]})
                await self._send_event("GUILD_CREATE", self._guild())
                self._connected.set()
            elif op == 6:
                if data.get("session_id") != self._session_id:
                    await ws.send_str(json.dumps({"op": 9, "d": False, "s": None, "t": None}))
                    continue
                owner, self._ws = True, ws
                self.resumes += 1
                for event in self._history:
                    if event["s"] > (data.get("seq") or 0):
                        await ws.send_str(json.dumps(event))
                await self._send_event("RESUMED", {})
                self._connected.set()
        if owner and self._ws is ws:
            self._ws = None
            self._connected.clear()
        return ws

    async def _send_event(self, name: str, data: dict[str, Any]) -> None:
        self._seq += 1
        event = {"op": 0, "t": name, "s": self._seq, "d": data}
        self._history.append(event)
        if self._ws is not None and not self._ws.closed:
            try:
                await self._ws.send_str(json.dumps(event))
            except ConnectionResetError:
                pass  # delivered on RESUME

    async def connected(self, timeout: float = 60) -> None:
        """Wait until the bot identified (or resumed) on the gateway."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def drop_gateway(self) -> None:
        """Close the bot's gateway connection abruptly (as a network failure or a Discord restart would)."""
        if self._ws is not None:
            self._connected.clear()
            await self._ws.close(code=4000, message=b"dropped by the test")

    def _channel(self, channel_id: str) -> dict[str, Any]:
        info = self.channels[channel_id]
        return {"id": channel_id, "type": 0, "guild_id": self.guild_id, "name": info["name"], "position": 0,
                "permission_overwrites": [], "nsfw": info["nsfw"], "topic": None, "last_message_id": None,
                "rate_limit_per_user": 0, "parent_id": None, "flags": 0}

    def _guild(self) -> dict[str, Any]:
        bot_member = {"user": self.bot_user, "roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}
        return {
            "id": self.guild_id, "name": "Dreamers", "icon": None, "owner_id": self.snowflake(), "unavailable": False,
            "roles": [{"id": self.guild_id, "name": "@everyone", "permissions": MEMBER, "position": 0, "color": 0,
                       "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [self._channel(c) for c in self.channels], "members": [bot_member], "member_count": 3,
            "joined_at": _now(), "large": False, "emojis": [], "stickers": [], "features": [], "voice_states": [],
            "presences": [], "threads": [], "stage_instances": [], "guild_scheduled_events": [], "mfa_level": 0,
            "verification_level": 0, "explicit_content_filter": 0, "default_message_notifications": 0,
            "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0, "system_channel_flags": 0,
            "afk_timeout": 300, "application_id": None, "premium_progress_bar_enabled": False,
        }

    # -- acting as members ------------------------------------------------------------------------------

    def add_attachment(self, data: bytes, filename: str, content_type: str = "image/png",
                       size: int | None = None) -> dict[str, Any]:
        """A file a member attached (downloadable from the double's CDN); `size` may claim another size."""
        attachment_id = self.snowflake()
        self.files[attachment_id] = (filename, data, content_type)
        return {"id": attachment_id, "filename": filename, "size": len(data) if size is None else size,
                "url": f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{filename}",
                "proxy_url": f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{filename}",
                "content_type": content_type}

    def _interaction(self, kind: int, user: Member, channel_id: str | None, data: dict[str, Any],
                     message: dict[str, Any] | None = None) -> tuple[Interaction, dict[str, Any]]:
        channel_id = channel_id or self.channel_id
        handle = Interaction(self.snowflake(), f"tok{self.snowflake()}", channel_id, user, sent_at=time.perf_counter())
        self.interactions[handle.token] = handle
        payload = {
            "id": handle.id, "application_id": self.app_id, "type": kind, "token": handle.token, "version": 1,
            "guild_id": self.guild_id, "channel_id": channel_id, "channel": self._channel(channel_id),
            "member": user.member(), "app_permissions": ADMIN, "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {"0": self.guild_id}, "context": 0,
            "attachment_size_limit": 10 * 2**20, "data": data,
        }
        if message is not None:
            payload["message"] = message
        return handle, payload

    async def slash(self, user: Member, name: str, options: dict[str, Any] | None = None, *,
                    subcommand: str | None = None, channel_id: str | None = None, focused: str | None = None) -> Interaction:
        """A member runs `/name [subcommand] option:value...` (values: str, int, bool, float, an attachment dict
        from `add_attachment`, a Member (user option) or `("channel", id)`). With `focused`, an autocomplete request."""
        built, resolved = [], {}
        for key, value in (options or {}).items():
            option: dict[str, Any] = {"name": key}
            if isinstance(value, bool):
                option |= {"type": 5, "value": value}
            elif isinstance(value, int):
                option |= {"type": 4, "value": value}
            elif isinstance(value, float):
                option |= {"type": 10, "value": value}
            elif isinstance(value, Member):
                option |= {"type": 6, "value": value.id}
                resolved.setdefault("users", {})[value.id] = value.user()
                resolved.setdefault("members", {})[value.id] = {k: v for k, v in value.member().items() if k != "user"}
            elif isinstance(value, tuple) and value[0] == "channel":
                option |= {"type": 7, "value": value[1]}
                resolved.setdefault("channels", {})[value[1]] = self._channel(value[1]) | {"permissions": ADMIN}
            elif isinstance(value, dict):
                option |= {"type": 11, "value": value["id"]}
                resolved.setdefault("attachments", {})[value["id"]] = value
            else:
                option |= {"type": 3, "value": value}
            if key == focused:
                option["focused"] = True
            built.append(option)
        if subcommand:
            built = [{"name": subcommand, "type": 1, "options": built}]
        data = {"id": self.snowflake(), "name": name, "type": 1, "options": built, "guild_id": self.guild_id}
        if resolved:
            data["resolved"] = resolved
        handle, payload = self._interaction(4 if focused else 2, user, channel_id, data)
        await self._send_event("INTERACTION_CREATE", payload)
        return handle

    async def click(self, user: Member, message_id: str, custom_id: str) -> Interaction:
        """A member presses a button of a message."""
        message = self.messages[message_id]
        handle, payload = self._interaction(3, user, message["channel_id"], {"custom_id": custom_id, "component_type": 2},
                                            message=message)
        handle.source_message_id = message_id
        await self._send_event("INTERACTION_CREATE", payload)
        return handle

    async def react(self, user: Member, message_id: str, emoji: str, *, add: bool = True) -> None:
        """A member adds (or removes) a reaction."""
        message = self.messages[message_id]
        data = {"user_id": user.id, "channel_id": message["channel_id"], "message_id": message_id,
                "guild_id": self.guild_id, "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}
        if add:
            data |= {"member": user.member(), "message_author_id": message["author"]["id"], "burst_colors": []}
        await self._send_event("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data)

    # -- what the bot did -------------------------------------------------------------------------------

    async def wait_for(self, condition, timeout: float = 60, what: str = "condition"):
        """Poll `condition()` (a function or coroutine function) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def original(self, handle: Interaction) -> dict[str, Any] | None:
        """The message an interaction's response created."""
        return self.messages.get(handle.original_id) if handle.original_id else None

    def file_of(self, message: dict[str, Any], index: int = 0) -> bytes:
        """The bytes of one of a message's attachments."""
        return self.files[message["attachments"][index]["id"]][1]

    def channel_messages(self, channel_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["channel_id"] == channel_id]

    def fail(self, method: str, path_regex: str, status: int = 429, times: int = 1, retry_after: float = 0.05,
             is_global: bool = False) -> Fault:
        """Answer the next `times` matching requests with `status` (429 with a retry-after, or a 5xx)."""
        fault = Fault(method, re.compile(path_regex), status, times, retry_after, is_global)
        self.faults.append(fault)
        return fault

    def expire_tokens(self) -> None:
        """Every interaction token so far stops working (as after 15 minutes)."""
        for handle in self.interactions.values():
            handle.expired = True

    # -- REST ---------------------------------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.Response:
        entry = self.files.get(request.match_info["id"])
        if entry is None:
            return web.Response(status=404)
        return web.Response(body=entry[1], content_type=entry[2])

    async def _read_body(self, request: web.Request) -> tuple[Any, dict[str, tuple[str, bytes]]]:
        if request.content_type.startswith("multipart/"):
            payload, files = None, {}
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files[part.name] = (part.filename, bytes(await part.read()))
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), {}

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # discord.py parses JSON only when the content type is exactly application/json
        return web.Response(status=status, body=json.dumps(data).encode(), headers={
            "Content-Type": "application/json", **(headers or {})})

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await self._read_body(request)
        for fault in self.faults:
            if fault.times > 0 and fault.method == request.method and fault.pattern.search(path):
                fault.times -= 1
                self.requests.append(Recorded(request.method, path, body, files, fault.status, time.perf_counter()))
                if fault.status == 429:
                    return self._json({"message": "You are being rate limited.", "retry_after": fault.retry_after,
                                       "global": fault.is_global}, 429,
                                      {"Retry-After": str(fault.retry_after), "Via": "1.1 google",
                                       "X-RateLimit-Scope": "global" if fault.is_global else "user"})
                return self._json({"message": "Server error", "code": 0}, fault.status)
        user_id = self._bearer_user(request)
        if user_id is not None and request.method == "GET" and path in ("/users/@me", "/users/@me/guilds"):
            account, guilds = self.accounts[user_id]
            response = self._json(account.user() if path == "/users/@me" else
                                  [{"id": guild, "name": "Test server", "icon": None, "owner": False,
                                    "permissions": account.permissions} for guild in guilds])
        else:
            response = self._route(request.method, path, body, files, request.query)
        self.requests.append(Recorded(request.method, path, body, files, response.status, time.perf_counter()))
        return response

    def _route(self, method: str, path: str, body: Any, files, query) -> web.Response:
        match = lambda pattern: re.fullmatch(pattern, path)  # noqa: E731
        if method == "GET" and path == "/users/@me":
            return self._json(self.bot_user)
        if method == "GET" and path == "/gateway/bot":  # how many shards Discord wants this bot to run
            return self._json({"url": self.gateway_url, "shards": self.shard_count,
                               "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0,
                                                       "max_concurrency": 1}})
        if method == "GET" and path == "/oauth2/applications/@me":
            return self._json({"id": self.app_id, "name": "Dreamloom", "icon": None, "description": "", "summary": "",
                               "bot_public": True, "bot_require_code_grant": False, "verify_key": "0" * 64,
                               "owner": {**self.bot_user, "bot": False}, "team": None, "flags": 0,
                               "rpc_origins": [], "interactions_endpoint_url": None, "bot": self.bot_user})
        if (m := match(r"/applications/(\d+)(?:/guilds/\d+)?/commands")) and method == "PUT":
            self.commands = [{**c, "id": self.snowflake(), "application_id": self.app_id, "version": "1"} for c in body]
            return self._json(self.commands)
        if m and method == "GET":
            return self._json(self.commands)
        if m := match(r"/interactions/(\d+)/([^/]+)/callback"):
            return self._callback(m.group(2), body, files)
        if m := match(r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)"):
            handle = self.interactions.get(m.group(2))
            if handle is None or handle.expired:
                return self._json({"message": "Invalid Webhook Token", "code": 50027}, 401)
            message_id = handle.original_id if m.group(3) == "@original" else m.group(3)
            if message_id not in self.messages:
                return self._json({"message": "Unknown Message", "code": 10008}, 404)
            if method == "PATCH":
                return self._json(self._edit(message_id, body or {}, files))
            if method == "DELETE":
                del self.messages[message_id]
                return web.Response(status=204)
            return self._json(self.messages[message_id])
        if (m := match(r"/webhooks/(\d+)/([^/]+)")) and method == "POST":
            handle = self.interactions.get(m.group(2))
            if handle is None or handle.expired:
                return self._json({"message": "Invalid Webhook Token", "code": 50027}, 401)
            return self._json(self._create(handle.channel_id, body or {}, files, interaction=handle))
        if (m := match(r"/channels/(\d+)/messages")) and method == "POST":
            if m.group(1) not in self.channels:
                return self._json({"message": "Unknown Channel", "code": 10003}, 404)
            return self._json(self._create(m.group(1), body or {}, files))
        if m := match(r"/channels/(\d+)/messages/(\d+)"):
            if m.group(2) not in self.messages:
                return self._json({"message": "Unknown Message", "code": 10008}, 404)
            if method == "PATCH":
                return self._json(self._edit(m.group(2), body or {}, files))
            if method == "DELETE":
                del self.messages[m.group(2)]
                return web.Response(status=204)
            return self._json(self.messages[m.group(2)])
        if match(r"/channels/(\d+)/messages/(\d+)/reactions/.+"):
            return web.Response(status=204)
        if (m := match(r"/channels/(\d+)")) and method == "GET" and m.group(1) in self.channels:
            return self._json(self._channel(m.group(1)))
        return self._json({"message": f"404: Not Found ({method} {path})", "code": 0}, 404)

    def _callback(self, token: str, body: dict[str, Any], files) -> web.Response:
        handle = self.interactions.get(token)
        if handle is None:
            return self._json({"message": "Unknown interaction", "code": 10062}, 404)
        if handle.callbacks and body["type"] != 8:
            return self._json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        handle.callbacks.append(body)
        handle.acknowledged_at = handle.acknowledged_at or time.perf_counter()
        kind, data = body["type"], body.get("data") or {}
        message = None
        if kind in (4, 5):
            flags = (data.get("flags") or 0) | (128 if kind == 5 else 0)
            message = self._create(handle.channel_id, {**data, "flags": flags}, files, interaction=handle)
            handle.original_id = message["id"]
        elif kind == 7:
            source = handle.source_message_id
            message = self._edit(source, data, files) if source else None
        elif kind == 8:
            self.autocomplete[handle.token] = data.get("choices", [])
        result: dict[str, Any] = {"interaction": {"id": handle.id, "type": 2}, "resource": {"type": kind}}
        if message is not None:
            result["interaction"] |= {"response_message_id": message["id"], "response_message_loading": kind == 5,
                                      "response_message_ephemeral": bool(message["flags"] & 64)}
            result["resource"]["message"] = message
        return self._json(result)

    def _attachments(self, body: dict[str, Any], files, existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = {str(a.get("id")) for a in body.get("attachments", [])}
        result = [a for a in existing if a["id"] in kept]
        for index, (filename, data) in sorted(files.items()):
            stored = self.add_attachment(data, filename, "image/png" if filename.endswith(".png") else "image/webp")
            result.append(stored)
        return result

    def _create(self, channel_id: str, body: dict[str, Any], files, interaction: Interaction | None = None) -> dict[str, Any]:
        message_id = self.snowflake()
        message = {
            "id": message_id, "channel_id": channel_id, "guild_id": self.guild_id, "author": self.bot_user,
            "content": body.get("content") or "", "embeds": body.get("embeds") or [], "components": body.get("components") or [],
            "attachments": self._attachments(body, files, []), "timestamp": _now(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [], "pinned": False,
            "type": 20 if interaction else 0, "flags": body.get("flags") or 0, "edits": 0,
        }
        if interaction is not None:
            message["webhook_id"] = self.app_id
            message["application_id"] = self.app_id
        self.messages[message_id] = message
        return message

    def _edit(self, message_id: str, body: dict[str, Any], files) -> dict[str, Any]:
        message = self.messages[message_id]
        for key in ("content", "embeds", "components", "flags"):
            if key in body and body[key] is not None:
                message[key] = body[key]
        if "attachments" in body or files:
            message["attachments"] = self._attachments(body, files, message["attachments"])
        if "flags" in message and not body.get("flags"):
            message["flags"] &= ~128  # no longer loading
        message["edited_timestamp"] = _now()
        message["edits"] += 1
        return message
