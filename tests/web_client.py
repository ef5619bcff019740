"""Web visitors for the gallery tests: a cookie-keeping HTTP client that signs in with Discord (through the Discord
API double's OAuth2 pages, as a browser would), and the double itself running on a thread of its own."""
from __future__ import annotations

import asyncio
import http.cookiejar
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from html import unescape

from tests.discord_double import DiscordDouble, Member


class DoubleOnAThread:
    """The Discord API double serving from a background event loop (the gallery runs in another process)."""

    def __init__(self) -> None:
        self.double = DiscordDouble()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="discord double", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.double.start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.double.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def env(self, public_url: str) -> dict[str, str]:
        """What `dreamloom serve` needs to offer Sign in with Discord against the double."""
        self.double.redirect_uris.append(public_url + "/auth/discord/callback")
        return {"DREAMLOOM_DISCORD_CLIENT_ID": self.double.client_id,
                "DREAMLOOM_DISCORD_CLIENT_SECRET": self.double.client_secret,
                "DREAMLOOM_DISCORD_API_BASE": self.double.api_base, "DREAMLOOM_DISCORD_OAUTH_URL": self.double.oauth_url,
                "DREAMLOOM_PUBLIC_URL": public_url}

    def account(self, user_id: str, name: str, guild_ids: list[str] | None = None) -> Member:
        member = Member(user_id, name)
        self.double.add_account(member, guild_ids)
        return member


class Visitor:
    """One browser's worth of cookies, without a browser."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
                ) -> tuple[int, bytes, dict]:
        url = path if path.startswith("http") else self.base + path
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with self.opener.open(request, timeout=60) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def get(self, path: str) -> tuple[int, bytes, dict]:
        return self.request("GET", path)

    def sign_in(self, name: str) -> Visitor:
        """Press Sign in with Discord and Authorize on the double's consent page; keeps the CSRF token."""
        with self.opener.open(self.base + "/sign-in", timeout=60) as response:
            consent_url, page = response.geturl().split("?")[0], response.read()
        assert b"wants to access your account" in page, page[:300]
        fields = {k.decode(): unescape(v.decode())
                  for k, v in re.findall(rb'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)}
        user_id = re.search(rb'<button name="user_id" value="(\d+)">Authorize as ' + name.encode() + b"<", page).group(1)
        status, _, _ = self.request("POST", consent_url, urllib.parse.urlencode({**fields, "user_id": user_id.decode()}).encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200, status
        me = json.loads(self.get("/api/me")[1])
        assert me["signed_in"], me
        self.csrf = me["csrf_token"]
        return self

    def post_json(self, path: str, data, *, csrf: str | None = None, headers: dict | None = None):
        token = self.csrf if csrf is None else csrf
        extra = {"Content-Type": "application/json", **({"X-CSRF-Token": token} if token else {}), **(headers or {})}
        return self.request("POST", path, json.dumps(data).encode(), extra)

    def post_form(self, path: str, form: dict, *, csrf: str | None = None):
        token = self.csrf if csrf is None else csrf
        body = urllib.parse.urlencode({**form, **({"csrf_token": token} if token else {})}).encode()
        return self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
