"""The web gallery in a real headless Chromium against a real `dreamloom serve`, plus its JSON API."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from studio.service import Studio
from studio.settings import Settings
from tests.conftest import ROOT
from tests.web_client import DoubleOnAThread, Visitor

DREAMLOOM = Path(sys.executable).parent / "dreamloom"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


class Site:
    """A running `dreamloom serve` with the gallery, and the studio over the same data for test set-up."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        registry = tmp / "models.toml"
        starter = ROOT / "models" / "starter-shapes"
        registry.write_text(
            'default = "starter-shapes"\n'
            f'[[models]]\nname = "starter-shapes"\npath = "{starter}"\nfamily = "starter"\n'
            f'[[models]]\nname = "starter-nsfw"\npath = "{starter}"\nfamily = "starter"\ntags = ["nsfw"]\n'
            f'[[loras]]\nname = "outline"\npath = "{ROOT / "models" / "loras" / "outline.safetensors"}"\n'
            'family = "starter"\ndescription = "Bold black outlines."\n')
        # Sign in with Discord goes through the Discord API double (its OAuth2 pages and token endpoint).
        self.discord = DoubleOnAThread()
        self.alice = self.discord.account("4001", "alice")
        self.bob = self.discord.account("4002", "bob")
        self.mallory = self.discord.account("4666", "mallory")
        self.gina = self.discord.account("4007", "gina", ["g1"])  # a member of the private server g1
        self.paula = self.discord.account("4008", "paula")
        self.env = {**os.environ, "DREAMLOOM_DATA_DIR": str(self.data), "DREAMLOOM_REGISTRY": str(registry),
                    "DREAMLOOM_GALLERY_PORT": str(self.port), "DREAMLOOM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                    "DREAMLOOM_MAX_QUEUED_PER_USER": "50", **self.discord.env(self.base),
                    # As behind a reverse proxy on this machine: tests name the client with X-Forwarded-For.
                    "DREAMLOOM_TRUSTED_PROXIES": '["127.0.0.1"]',
                    "DREAMLOOM_WEB_IDLE_TIMEOUT_S": "3"}  # short, so the slow-client test is quick
        self.settings = Settings(data_dir=self.data, registry=registry, max_queued_per_user=50)
        # Output to a file, not a pipe nobody reads: a full pipe would block the server mid-test.
        self.log = tmp / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(DREAMLOOM), "serve"], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and self.process.poll() is None:
            try:
                if _get(self.base + "/")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("the gallery did not start: " + self.log.read_text(errors="replace")[-2000:])

    def studio(self, work):
        async def run():
            studio = await Studio.open(self.settings)
            try:
                return await work(studio)
            finally:
                await studio.close()

        # Its own thread: Playwright's sync API keeps an event loop running in the test thread.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def wait_done(self, job_id: int, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.studio(lambda s: s.job(job_id)).to_dict()
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish")

    def visitor(self, name: str | None = None) -> Visitor:
        """A web visitor with cookies of their own; signed in with Discord as `name` when given."""
        visitor = Visitor(self.base)
        return visitor.sign_in(name) if name else visitor

    def sign_in(self, page, name: str) -> None:
        """Sign in with Discord in Chromium: the gallery's button, then Authorize on Discord's (the double's) page."""
        page.goto(self.base + "/")
        page.click("#sign-in")
        page.click(f"text=Authorize as {name}")
        page.wait_for_selector("#sign-out")

    def stop(self) -> None:
        """Stop the server (also when the fixture's set-up failed, so no `serve` outlives the tests)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.discord.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("gallery"))
    try:
        grid = site.studio(lambda s: s.submit_imagine("alice", "a red circle on a blue background --seed 7 --steps 10"))
        site.grid = site.wait_done(grid.id)
        first = site.grid["images"][0]["id"]
        upscale = site.studio(lambda s: s.submit_from_image("bob", first, "upscale", "detail"))
        site.upscale = site.wait_done(upscale.id)
        outlined = site.studio(lambda s: s.submit_imagine("erin", "a yellow triangle --lora outline --seed 3 --steps 10 --n 1"))
        site.outlined = site.wait_done(outlined.id)
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium must be installed in CI (make test installs Debian's chromium).")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def test_browse_the_gallery_open_an_image_and_follow_its_lineage(site, browser):
    page = browser.new_page()
    page.goto(site.base + "/?period=all")
    cards = page.locator("#grid .card")
    assert cards.count() >= 5  # the grid's four images and the upscale
    page.wait_for_function("() => { const img = document.querySelector('#grid .card img');"
                           " return img.complete && img.naturalWidth > 0; }")
    source = site.grid["images"][0]["id"]
    page.goto(f"{site.base}/image/{source}")
    assert page.inner_text("#prompt") == "a red circle on a blue background"
    assert page.inner_text("#seed") == "7"
    assert page.locator("a.sibling").count() == 3
    page.click("a.child")  # its upscale
    assert page.url.endswith(f"/image/{site.upscale['images'][0]['id']}")
    page.wait_for_function("() => document.querySelector('#image').naturalWidth === 128")
    page.click("a.parent")
    assert page.url.endswith(f"/image/{source}")
    page.close()


def test_a_loras_page_lists_the_images_made_with_it(site, browser):
    page = browser.new_page()
    outlined = site.outlined["images"][0]["id"]
    page.goto(f"{site.base}/image/{outlined}")
    assert page.inner_text("#loras").startswith("outline")
    page.click("#loras a.lora")
    assert page.url.endswith("/lora/outline")
    assert page.inner_text("h1") == "LoRA outline"
    page.click("nav.tabs >> text=All time")
    shown = {int(card.get_attribute("data-id")) for card in page.locator("#grid .card").all()}
    assert shown == {outlined}  # not the plain grid nor its upscale
    page.goto(site.base + "/?period=all")
    page.click("#browse a.lora >> text=outline")  # the gallery links every LoRA's page
    assert page.url.endswith("/lora/outline?period=all")
    page.close()
    items = json.loads(_get(site.base + "/api/gallery?period=all&lora=outline")[1])["items"]
    assert [item["id"] for item in items] == [outlined]
    assert json.loads(_get(site.base + "/api/gallery?period=all&lora=nobody")[1])["items"] == []


def test_sign_in_with_discord_and_vote_from_the_image_page(site, browser):
    page = browser.new_page()
    image_id = site.grid["images"][2]["id"]
    page.goto(f"{site.base}/image/{image_id}")
    assert page.is_disabled("#up") and "Sign in with Discord" in page.inner_text("#vote-message")
    site.sign_in(page, "alice")
    assert page.inner_text("#me") == "alice"
    page.goto(f"{site.base}/image/{image_id}")
    page.click("#up")
    page.wait_for_function("() => document.querySelector('#up span').textContent === '1'")
    page.click("#up")  # a second click takes the vote back
    page.wait_for_function("() => document.querySelector('#up span').textContent === '0'")
    page.click("#down")
    page.wait_for_function("() => document.querySelector('#down span').textContent === '1'")
    page.reload()  # the visitor's own vote is shown after a reload too
    assert page.get_attribute("#down", "class").split() == ["vote", "on"]
    assert page.get_attribute("#up", "class").split() == ["vote"]
    page.click("#down")
    page.wait_for_function("() => document.querySelector('#down span').textContent === '0'")
    page.click("#up")
    page.wait_for_function("() => document.querySelector('#up span').textContent === '1'")

    async def vote_of(studio):
        return await studio.community.vote_of(image_id, f"discord:{site.alice.id}")

    assert site.studio(vote_of) == 1  # the web vote is the Discord member's one vote
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    page.goto(f"{site.base}/image/{image_id}")
    assert page.is_disabled("#up")
    page.close()


def test_infinite_scroll_adds_cards_like_the_servers(site, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(site.base + "/?period=new&per_page=1")  # one card from the server; the rest by infinite scroll
    for _ in range(40):
        if page.locator("#grid .card").count() >= 4:
            break
        page.mouse.wheel(0, 2000)  # scroll down as a visitor does: the "More" link comes into view
        page.wait_for_timeout(250)
    assert page.locator("#grid .card").count() >= 4

    def shape(card):
        return card.evaluate("c => [...c.querySelectorAll('*')].map(e => e.tagName + '.' + e.className + "
                             "(e.tagName === 'IMG' ? ':' + e.getAttribute('loading') + ':' + (e.getAttribute('width') > 0) : '')"
                             ").join(' ')")
    cards = page.locator("#grid .card").all()
    assert {shape(card) for card in cards} == {shape(cards[0])}  # the script's cards are built like the server's
    ids = [card.get_attribute("data-id") for card in cards]
    assert len(ids) == len(set(ids))  # pages follow one another: none skipped or repeated
    assert "starter-" in cards[1].inner_text() and "▲" in cards[1].inner_text()
    page.close()


def test_security_headers_and_malformed_input_never_500(site):
    for path in ("/", "/image/1", "/files/1.png", "/api/gallery", "/nope", "/favicon.svg"):
        _, _, headers = _get(site.base + path)
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
    for path in ("/?page=%C2%B2", "/api/gallery?per_page=%D9%A1", "/?page=%EF%BC%91"):  # ², ١ and a full-width 1
        assert _get(site.base + path)[0] == 400, path
    image_id = site.grid["images"][3]["id"]
    before = json.loads(_get(f"{site.base}/api/images/{image_id}")[1])["up"]
    member = site.visitor("bob")
    for body in (b'{"value": 1e999}', b'{"value": 1.9}', b'{"value": true}', b'{"value": "-1"}', b'[1]', b"nonsense",
                 b'{"value": 2}'):
        status, _, _ = member.request("POST", f"/api/images/{image_id}/vote", body,
                                      {"Content-Type": "application/json", "X-CSRF-Token": member.csrf})
        assert status == 400, body
    assert json.loads(_get(f"{site.base}/api/images/{image_id}")[1])["up"] == before


def test_unknown_pages_are_404_and_the_favicon_is_served(site):
    assert _get(site.base + "/model/nope")[0] == 404
    assert _get(site.base + "/lora/nope")[0] == 404
    assert _get(site.base + "/member/nobody-here")[0] == 404
    assert _get(site.base + "/model/starter-shapes")[0] == 200
    assert _get(site.base + "/member/alice?period=all")[0] == 200
    status, body, headers = _get(site.base + "/favicon.ico")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and body.startswith(b"<svg")
    status, body, _ = _get(site.base + "/")
    assert b'rel="icon" href="/favicon.svg"' in body


def test_imagine_form_shows_progress_and_the_result(site, browser):
    page = browser.new_page()
    page.goto(site.base + "/imagine")
    assert page.locator("#imagine").count() == 0 and "Sign in with Discord" in page.inner_text("#read-only-notice")
    site.sign_in(page, "bob")
    page.goto(site.base + "/imagine")
    page.fill("#prompt-input", "a yellow star on a purple background --steps 30 --seed 5")
    page.click("#submit")
    assert "/jobs/" in page.url
    page.wait_for_selector("#results .card", timeout=120_000)
    assert page.locator("#results .card").count() == 4
    job_url = page.url
    page.click("#reroll button")  # the same prompt with new seeds, as Discord's 🔄
    assert "/jobs/" in page.url and page.url != job_url
    page.wait_for_selector("#results .card", timeout=120_000)
    page.click("#results .card")
    page.click("#make >> text=Vary (subtle)")  # as Discord's V1-V4
    assert "/jobs/" in page.url
    page.wait_for_selector("#results .card", timeout=120_000)
    assert page.locator("#results .card").count() == 4
    page.goto(site.base + "/imagine")
    page.fill("#prompt-input", "a cat --chaos 400")
    page.click("#submit")
    assert "--chaos takes a whole number from 0 to 100" in page.inner_text("#error")
    page.close()


def test_cancel_a_running_job_from_its_page(site, browser):
    page = browser.new_page()
    site.sign_in(page, "alice")
    page.goto(site.base + "/imagine")
    page.fill("#prompt-input", "a white square on a red background --steps 150 --q 2 --seed 9")
    page.click("#submit")
    job_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('step')", timeout=120_000)
    stranger = browser.new_context().new_page()  # another member gets no button and a 403
    site.sign_in(stranger, "mallory")
    stranger.goto(f"{site.base}/jobs/{job_id}")
    assert stranger.locator("#cancel").count() == 0
    answer = stranger.evaluate(f"fetch('/api/jobs/{job_id}/cancel', {{method: 'POST', headers: {{'Content-Type': "
                               "'application/json', 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]')"
                               ".content}, body: '{}'}).then(r => r.status)")
    assert answer == 403
    stranger.context.close()
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').dataset.status === 'cancelled'", timeout=60_000)
    job = site.wait_done(job_id)
    assert job["status"] == "cancelled" and job["images"] == []
    page.close()


def test_pages_read_without_javascript(site, browser):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(site.base + "/?period=new")
    assert page.locator("#grid .card").count() >= 5
    page.goto(f"{site.base}/image/{site.grid['images'][1]['id']}")
    assert page.inner_text("#seed") == "8"
    context.close()


def test_json_api_and_ranking_by_votes(site):
    a, b = site.grid["images"][0]["id"], site.grid["images"][1]["id"]

    async def vote(studio):
        for i in range(3):
            await studio.community.vote(a, f"fan{i}", 1)
        for i in range(30):
            await studio.community.vote(b, f"crowd{i}", 1 if i < 16 else -1)

    site.studio(vote)
    status, body, _ = _get(site.base + "/api/gallery?period=all&per_page=3")
    items = json.loads(body)["items"]
    assert status == 200 and [i["id"] for i in items[:2]] == [a, b]  # 3 up / 0 down beats 16 up / 14 down
    detail = json.loads(_get(f"{site.base}/api/images/{a}")[1])
    assert detail["up"] == 3 and detail["seed"] == 7 and "path" not in detail
    status, _, headers = _get(f"{site.base}/files/{a}.png")
    assert status == 200 and "immutable" in headers["Cache-Control"]
    status, body, headers = _get(f"{site.base}/thumbs/{a}.webp")
    assert status == 200 and headers["Content-Type"] == "image/webp" and body[:4] == b"RIFF"


@pytest.mark.parametrize("path,expected", [
    ("/image/../../etc/passwd", 404), ("/files/..%2F..%2Fetc%2Fpasswd", 404), ("/files/%2e%2e/x.png", 404),
    ("/files/1.png/../../../etc/passwd", 404), ("/%2e%2e/%2e%2e/etc/passwd", 404), ("/image/999999", 404),
    ("/api/images/999999", 404), ("/api/jobs/999999", 404), ("/files/999999.png", 404), ("/image/abc", 404),
    ("/model/..%2F..%2Fetc", 404), ("/lora/..%2F..%2Fetc", 404), ("/lora/a%20b", 404), ("/lora/x?page=0", 400), ("/?page=99999999", 400), ("/?page=-1", 400), ("/?page=1001", 400),
    ("/?period=forever", 400), ("/api/gallery?per_page=100000", 400), ("/image/1" + "1" * 30, 404),
])
def test_hostile_urls_get_404_or_400(site, path, expected):
    request = urllib.request.Request(site.base + path)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == expected


def test_banned_members_nsfw_models_and_private_guilds_are_hidden(site):
    nsfw = site.studio(lambda s: s.submit_imagine("carol", "a green square --model starter-nsfw --steps 4 --n 1"))
    hidden = site.wait_done(nsfw.id)["images"][0]["id"]
    assert _get(f"{site.base}/image/{hidden}")[0] == 404
    assert _get(f"{site.base}/files/{hidden}.png")[0] == 404
    visible = site.grid["images"][3]["id"]
    assert _get(f"{site.base}/image/{visible}")[0] == 200

    async def ban(studio):
        from storage.queue import ensure_user

        async with studio.db.session() as session:
            (await ensure_user(session, "alice")).banned = True

    site.studio(ban)
    assert _get(f"{site.base}/image/{visible}")[0] == 404
    listed = {i["id"] for i in json.loads(_get(site.base + "/api/gallery?period=new&per_page=100")[1])["items"]}
    assert visible not in listed and hidden not in listed

    async def unban(studio):
        from storage.queue import ensure_user

        async with studio.db.session() as session:
            (await ensure_user(session, "alice")).banned = False

    site.studio(unban)
    assert _get(f"{site.base}/image/{visible}")[0] == 200

    # A Discord server's images stay out of the public gallery until the server opts in.
    private = site.studio(lambda s: s.submit_imagine("dave", "a blue star --steps 4 --n 1", guild_id="g1"))
    guild_image = site.wait_done(private.id)["images"][0]["id"]
    assert _get(f"{site.base}/image/{guild_image}")[0] == 404
    assert _get(f"{site.base}/jobs/{private.id}")[0] == 404 and _get(f"{site.base}/api/jobs/{private.id}")[0] == 404
    # ...but its own members, signed in with Discord, see it.
    gina = site.visitor("gina")
    assert gina.get(f"/image/{guild_image}")[0] == 200 and gina.get(f"/files/{guild_image}.png")[0] == 200
    assert guild_image in {i["id"] for i in json.loads(gina.get("/api/gallery?period=new&per_page=100")[1])["items"]}
    assert site.visitor("bob").get(f"/image/{guild_image}")[0] == 404

    async def opt_in(studio):
        from storage.models import Guild

        async with studio.db.session() as session:
            session.add(Guild(id="g1", name="g1", settings={"public_gallery": True}))

    site.studio(opt_in)
    assert _get(f"{site.base}/image/{guild_image}")[0] == 200
    assert _get(f"{site.base}/api/jobs/{private.id}")[0] == 200


def _state(site, image_id: int) -> tuple:
    """What an attack must not change: the image's counts, every vote row, the job table."""
    async def read(studio):
        from sqlalchemy import func, select

        from storage.models import Job, Vote

        async with studio.db.session() as session:
            votes = await session.scalar(select(func.count()).select_from(Vote))
            jobs = await session.scalar(select(func.count()).select_from(Job))
        detail = await studio.showcase.image_detail(image_id)
        return detail["up"], detail["down"], votes, jobs

    return site.studio(read)


def test_cookieless_forged_and_cross_site_requests_change_nothing(site):
    image_id, job_id = site.grid["images"][1]["id"], site.grid["id"]
    before = _state(site, image_id)
    anonymous = site.visitor()
    refused = []
    for _ in range(30):  # the attack: 30 cookieless up-votes
        refused.append(anonymous.post_json(f"/api/images/{image_id}/vote", {"value": 1})[0])
    for _ in range(40):  # and 40 anonymous generations
        refused.append(anonymous.post_form("/imagine", {"prompt": "a cat"})[0])
    forged = site.visitor()
    for name, value in (("dreamloom_session", "forged-token"), ("dreamloom_web", "0123456789abcdef")):
        status, body, _ = forged.request("POST", f"/api/images/{image_id}/vote", b'{"value": 1}', {
            "Content-Type": "application/json", "Cookie": f"{name}={value}", "X-CSRF-Token": "x"})
        refused.append(status)
    member = site.visitor("bob")
    refused.append(member.post_json(f"/api/images/{image_id}/vote", {"value": 1}, csrf="")[0])  # no token
    refused.append(member.post_json(f"/api/images/{image_id}/vote", {"value": 1}, csrf="guessed")[0])
    refused.append(member.post_form("/imagine", {"prompt": "a cat"}, csrf="")[0])
    refused.append(member.post_form(f"/jobs/{job_id}/reroll", {}, csrf="")[0])
    refused.append(member.post_form(f"/image/{image_id}/make", {"action": "vary-subtle"}, csrf="")[0])
    refused.append(member.post_json(f"/api/jobs/{job_id}/cancel", {}, csrf="")[0])
    refused.append(member.post_form("/sign-out", {}, csrf="")[0])
    # A page on another site posting with the member's cookies (the browser says so in Sec-Fetch-Site).
    refused.append(member.post_json(f"/api/images/{image_id}/vote", {"value": 1},
                                    headers={"Sec-Fetch-Site": "cross-site"})[0])
    assert refused == [403] * len(refused)
    status, body, _ = anonymous.post_json(f"/api/images/{image_id}/vote", {"value": 1})
    assert "Sign in with Discord" in json.loads(body)["error"]
    status, body, _ = member.post_json(f"/api/images/{image_id}/vote", {"value": 1}, csrf="guessed")
    assert "CSRF" in json.loads(body)["error"]
    assert _state(site, image_id) == before
    assert json.loads(member.get("/api/me")[1])["signed_in"]  # the refused sign-out signed nobody out


def test_rate_limits_answer_429_with_retry_after(site):
    member = site.visitor("mallory")
    proxy = {"X-Forwarded-For": "198.51.100.1"}
    statuses = []
    for _ in range(7):  # 6 generations a minute per member; these prompts are refused, but each try counts
        status, body, headers = member.request("POST", "/imagine", f"prompt=a+cat+--chaos+400&csrf_token={member.csrf}"
                                               .encode(), {"Content-Type": "application/x-www-form-urlencoded", **proxy})
        statuses.append(status)
    assert statuses == [400] * 6 + [429]
    assert int(headers["Retry-After"]) >= 1 and b"Too many generations" in body
    # The events stream, per visitor (not signed in: per address).
    viewer = site.visitor()
    codes = [viewer.request("GET", f"/jobs/{site.grid['id']}/events", headers={"X-Forwarded-For": "198.51.100.2"})[0]
             for _ in range(61)]
    assert codes == [200] * 60 + [429]
    # Many members behind one address: 120 requests a minute per address.
    address = {"X-Forwarded-For": "198.51.100.3"}
    image_id = site.grid["images"][0]["id"]
    codes = []
    for name in ("alice", "bob", "mallory"):
        voter = site.visitor(name)
        codes += [voter.post_json(f"/api/images/{image_id}/vote", {"value": 1 if i % 2 else -1}, headers=address)[0]
                  for i in range(41)]
    assert codes.count(429) == 3 and codes[-1] == 429 and 429 not in codes[:120]
    # Another address is not held back by that one.
    assert site.visitor("alice").post_json(f"/api/images/{image_id}/vote", {"value": 0},
                                           headers={"X-Forwarded-For": "198.51.100.4"})[0] == 200


def test_models_from_paths_are_refused_on_the_web_without_revealing_them(site):
    member = site.visitor("paula")  # her own limit of 6 generations a minute: nobody else's tries count
    before = _state(site, site.grid["images"][0]["id"])
    starter_folder = str(ROOT / "models" / "starter-shapes")  # the nsfw model's folder too
    answers = set()
    for path in (starter_folder, "/etc", "/root/x.safetensors", "~nosuchuser", "/" + "a" * 300, "../models"):
        status, body, _ = member.post_form("/imagine", {"prompt": f"a cat --model {path}"})
        assert status == 400, (path, status)
        error = re.search(rb'id="error">([^<]*)<', body).group(1).decode()
        assert "/" not in error and "~" not in error, error
        answers.add(error)
    assert len(answers) == 1 and "registered model" in answers.pop()
    assert _state(site, site.grid["images"][0]["id"]) == before  # nothing queued


def test_pages_keep_working_under_the_content_security_policy(site, browser):
    page = browser.new_page()
    violations = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    site.sign_in(page, "bob")
    image_id = site.grid["images"][0]["id"]
    for path in ("/?period=all&per_page=2", f"/image/{image_id}", f"/jobs/{site.grid['id']}", "/imagine",
                 "/model/starter-shapes", "/lora/outline?period=all", "/nope"):
        response = page.goto(site.base + path)
        headers = response.headers
        assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in \
            headers["content-security-policy"].split("script-src")[1].split(";")[0], path
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin", path
    page.goto(f"{site.base}/image/{image_id}")
    page.click("#up")  # the vote script runs (from /static/image.js)
    page.wait_for_function("() => document.querySelector('#up').classList.contains('on')")
    page.click("#up")
    page.wait_for_function("() => !document.querySelector('#up').classList.contains('on')")
    assert violations == []
    page.close()


ROUTES = ["/", "/model/{s}", "/lora/{s}", "/member/{s}", "/image/{n}", "/image/{n}/make", "/files/{n}.png",
          "/thumbs/{n}.webp", "/imagine", "/jobs/{n}", "/jobs/{n}/reroll", "/jobs/{n}/events", "/api/gallery",
          "/api/images/{n}", "/api/jobs/{n}", "/api/images/{n}/vote", "/api/jobs/{n}/cancel", "/api/me", "/sign-in",
          "/auth/discord/callback", "/sign-out", "/static/{s}.js", "/favicon.svg"]


def test_a_route_and_api_fuzz_finds_no_500(site):
    """Every route, with hostile path segments, query strings and bodies, from a signed-in member (valid CSRF token,
    so bodies are read): the answer is never a server error, and the server logs no traceback."""
    from hypothesis import HealthCheck, example, given, settings as hypothesis_settings, strategies as st

    member = site.visitor("bob")
    real = [str(site.grid["images"][0]["id"]), str(site.grid["id"])]
    numbers = st.one_of(st.sampled_from(real), st.integers(0, 10**12).map(str), st.sampled_from(["0", "9" * 12]))
    words = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["..", "%2e%2e", "starter-shapes", "outline",
                                                                         "image", "a" * 300, "%00", "%F0%9F%92%A5"]))
    query_values = st.one_of(st.text(max_size=20), st.sampled_from(["²", "-1", "1e999", "9" * 30, "new", "all", "0"]))
    json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3), max_leaves=6)
    bodies = st.one_of(json_values.map(lambda v: ("application/json", json.dumps(v).encode())),
                       st.fixed_dictionaries({"value": json_values}).map(lambda v: ("application/json",
                                                                                    json.dumps(v).encode())),
                       st.binary(max_size=200).map(lambda b: ("application/json", b)),
                       st.dictionaries(st.sampled_from(["prompt", "action", "value", "x"]), st.text(max_size=60),
                                       max_size=3).map(lambda d: ("application/x-www-form-urlencoded",
                                                                  urllib.parse.urlencode(d).encode())),
                       st.binary(max_size=200).map(lambda b: ("multipart/form-data; boundary=x", b)))
    seen = []

    @hypothesis_settings(max_examples=int(os.environ.get("DREAMLOOM_FUZZ_EXAMPLES", 250)), deadline=None,
                         database=None, suppress_health_check=list(HealthCheck))
    @example(route="/imagine", number="1", word="0", method="POST", query={},  # found by this test: it was a 500
             body=("multipart/form-data; boundary=x", b""))
    @given(route=st.sampled_from(ROUTES), number=numbers, word=words, method=st.sampled_from(["GET", "POST"]),
           query=st.dictionaries(st.sampled_from(["page", "per_page", "period", "model", "lora", "user", "next",
                                                  "state", "code", "error"]), query_values, max_size=3),
           body=bodies)
    def request(route, number, word, method, query, body):
        path = route.replace("{n}", number).replace("{s}", urllib.parse.quote(word, safe="%"))
        if query:
            path += "?" + urllib.parse.urlencode(query)
        if (route.endswith("/events") and method == "GET") or (route == "/sign-out" and method == "POST"):
            return  # a live stream (covered elsewhere); signing out would end the fuzzing member's session
        content_type, data = body
        headers = {"X-Forwarded-For": f"192.0.2.{len(seen) % 250}"}
        if method == "POST":
            headers |= {"Content-Type": content_type, "X-CSRF-Token": member.csrf}
        status, _, _ = member.request(method, path, data if method == "POST" else None, headers)
        seen.append((status, method, path))
        assert status < 500, (method, path, data)

    request()
    assert len(seen) > 200 and {status for status, _, _ in seen} & {400, 403, 404}
    log = site.log.read_text(errors="replace")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


def test_silent_and_slow_clients_are_cut_off(site):
    """A connection that never completes its request headers is closed after the idle timeout (3 s here)."""
    silent = socket.create_connection(("127.0.0.1", site.port))
    slow = socket.create_connection(("127.0.0.1", site.port))
    silent.settimeout(20)
    slow.settimeout(0.5)
    started = time.monotonic()
    assert silent.recv(1) == b""  # closed by the server
    assert time.monotonic() - started < 10
    slow.sendall(b"GET / HTTP/1.1\r\n")
    started, closed = time.monotonic(), False
    while time.monotonic() - started < 20 and not closed:
        try:
            slow.sendall(b"X-Slow: header\r\n")  # a header line every half second, never the end
            closed = slow.recv(1) == b""
        except socket.timeout:
            continue
        except OSError:
            closed = True
    assert closed and time.monotonic() - started < 10
    silent.close()
    slow.close()


def test_client_addresses_come_from_forwarded_for_only_behind_a_trusted_proxy():
    from aiohttp.test_utils import make_mocked_request

    from gallery.guard import STUDIO, client_address

    class Holder:
        def __init__(self, proxies):
            self.settings = Settings(trusted_proxies=proxies)

    def address(peer, forwarded, proxies):
        app = {STUDIO: Holder(proxies)}
        request = make_mocked_request("GET", "/", headers={"X-Forwarded-For": forwarded}, app=app)
        request._transport_peername = (peer, 1234)
        return client_address(request.clone(remote=peer))

    assert address("203.0.113.9", "198.51.100.1", []) == "203.0.113.9"  # no proxy configured: the header is ignored
    assert address("203.0.113.9", "198.51.100.1", ["10.0.0.0/8"]) == "203.0.113.9"  # not from the proxy
    assert address("10.1.2.3", "198.51.100.1", ["10.0.0.0/8"]) == "198.51.100.1"
    # The client may send its own X-Forwarded-For: the proxy appends; the last untrusted hop is the client.
    assert address("10.1.2.3", "1.2.3.4, 198.51.100.1, 10.9.9.9", ["10.0.0.0/8"]) == "198.51.100.1"


def test_where_an_admin_allows_anonymous_visitors_their_web_votes_are_kept_apart(tmp_path):
    """In process (aiohttp's test client): a visitor gets an anonymous session on their first page, votes with its
    CSRF token, sees their vote, and the counts do not move."""
    from aiohttp.test_utils import TestClient, TestServer

    from gallery.app import create_app
    from tests.aio import run
    from tests.test_studio import finish

    async def scenario():
        studio = await Studio.open(Settings(data_dir=tmp_path, web_allow_anonymous=True))
        job = await studio.submit_imagine("discord:1", "a red circle --n 1")
        image_id, = await finish(studio, job.id, count=1)
        client = TestClient(TestServer(create_app(studio)))
        await client.start_server()
        try:
            page = await (await client.get(f"/image/{image_id}")).text()
            assert "kept apart until you sign in" in page and "read-only" not in page
            token = re.search(r'<meta name="csrf-token" content="([^"]+)">', page).group(1)
            answer = await client.post(f"/api/images/{image_id}/vote", json={"value": 1}, headers={"X-CSRF-Token": token})
            assert answer.status == 200 and await answer.json() == {"up": 0, "down": 0}
            page = await (await client.get(f"/image/{image_id}")).text()
            assert 'class="vote on"' in page  # their own vote is shown to them
            assert (await studio.showcase.image_detail(image_id))["up"] == 0
        finally:
            await client.close()
            await studio.close()

    # Its own thread: Playwright's sync API (the browser fixture of this module) keeps a loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run, scenario()).result()


def test_a_learning_job_shows_its_progress_result_and_the_learned_styles_page(site, browser):
    """A house style learned by a queued job in `serve`: the job page shows what was learned with the base above
    and the style below; the style's page shows its version, data and evaluation; its pictures are found by the
    style's name only."""
    grids = [site.studio(lambda s, i=i: s.submit_imagine("cli:maker", f"a {shape} --seed {i} --steps 8"))
             for i, shape in enumerate(["circle", "square", "triangle", "star"])]
    jobs = [site.wait_done(grid.id) for grid in grids]

    async def rate(studio):
        for job in jobs:
            for image in job["images"]:
                await studio.community.vote(image["id"], "discord:4001", 1 if image["index"] <= 2 else -1)
        return await studio.submit_learn("cli:owner", steps=6)

    learning = site.studio(rate)
    page = browser.new_page()
    page.goto(f"{site.base}/jobs/{learning.id}")
    finished = site.wait_done(learning.id, timeout=240)
    assert finished["status"] == "done", finished["error"]
    name = finished["settings"]["style"]["name"]
    assert name == "house-starter-shapes-v1"
    page.wait_for_selector("#learned", timeout=30_000)  # the page reloads when the job ends
    assert name in page.inner_text("#learned")
    page.wait_for_function("() => document.querySelector('#before-after').naturalWidth >= 4 * 192")
    shots = os.environ.get("SCREENSHOTS_DIR")
    if shots:
        page.screenshot(path=f"{shots}/learn-job.png", full_page=True)
    page.click(f"#learned a >> text={name}")
    assert page.url.endswith(f"/lora/{name}")
    assert page.inner_text("h1") == f"Learned style {name}"
    text = page.inner_text("#style")
    assert "house style of starter-shapes, version 1" in text and "held-out preference accuracy" in text
    assert "8 liked and 8 disliked images" in text or "liked and" in text
    page.wait_for_function("() => document.querySelector('#loss-curve').naturalWidth > 0 && "
                           "document.querySelector('#before-after').naturalWidth > 0")
    if shots:
        page.screenshot(path=f"{shots}/learned-style.png", full_page=True)
    page.close()
    for path in (f"/styles/{name}/report.png", "/styles/nobody/loss.png", f"/styles/{name}/..%2F..%2Fdreamloom.db",
                 "/lora/house-starter-shapes-v9"):
        assert _get(site.base + path)[0] == 404, path
    # Retired, so that the style is in no later generation of this module's site.
    site.studio(lambda s: s.set_style_status(name, "retired"))
