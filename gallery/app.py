"""The community gallery on the web: pages, image files, a JSON API and live job progress."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from PIL import Image

from dreamloom.errors import DreamloomError, InvalidRequest, LimitReached, NotAllowed, NotFound, public_message

from gallery.guard import (LIMITS, SESSION_COOKIE, SIGN_IN_COOKIE, STUDIO, RateLimits, address_within, client_address, cookie_options, csrf, identity,
                           member, read_form, read_json, read_only_reason)
from studio.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, database_text
from studio.service import TERMINAL, Studio
from studio.showcase import GalleryQuery
from studio.signin import CALLBACK_PATH

log = logging.getLogger(__name__)
THUMBNAIL_SIDE = 256
PERIOD_TITLES = {"day": "Today", "week": "This week", "all": "All time", "new": "Newest"}
FILTERS = {"model": "model", "lora": "lora", "user": "user_id"}  # JSON API query parameter -> GalleryQuery field


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _status(error: DreamloomError) -> int:
    """The HTTP status of a studio error."""
    return (404 if isinstance(error, NotFound) else 403 if isinstance(error, NotAllowed)
            else 429 if isinstance(error, LimitReached) else 400)


@web.middleware
async def errors(request: web.Request, handler):
    """The one handler that turns studio errors into 404 / 400 answers (JSON under /api, HTML elsewhere)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DreamloomError as error:
        status = _status(error)
        if _wants_json(request):
            response = web.json_response({"error": public_message(error)}, status=status)
        else:
            response = aiohttp_jinja2.render_template("error.html", request, {"message": public_message(error),
                                                                             "status": status})
            response.set_status(status)
        if isinstance(error, LimitReached) and error.retry_after:
            response.headers["Retry-After"] = str(int(error.retry_after))
        return response


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Scripts only from our own static files (none inline), no framing (clickjacking), no plugins, no <base>
    # tricks, forms post only here. Styles stay inline (one <style> in base.html); previews are data: images.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; object-src 'none'; base-uri 'none'",
}


@web.middleware
async def security_headers(request: web.Request, handler):
    """Headers every answer carries (pages, files, the API and errors alike)."""
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


def _int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name, str(default))
    if not re.fullmatch(r"[0-9]{1,6}", value):  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
        raise InvalidRequest(f"{name} must be a whole number; got {value[:20]!r}.")
    return int(value)


def _viewer_guilds(request: web.Request) -> tuple[str, ...]:
    who = member(request)
    return who.guild_ids if who and who.verified else ()


def _query(request: web.Request, **fixed) -> GalleryQuery:
    period = request.query.get("period", "day")
    return GalleryQuery(period=period, page=_int(request, "page", 1), per_page=_int(request, "per_page", 24),
                        viewer_guilds=_viewer_guilds(request), **fixed).check()


def _item_json(item) -> dict:
    return {"id": item.image_id, "job_id": item.job_id, "prompt": item.prompt, "model": item.model, "user": item.user_id,
            "up": item.up, "down": item.down, "score": round(item.score, 4), "width": item.width, "height": item.height,
            "created_at": item.created_at.isoformat(), "url": f"/image/{item.image_id}",
            "thumbnail": f"/thumbs/{item.image_id}.webp", "file": f"/files/{item.image_id}.png"}


async def _page_context(request: web.Request) -> dict:
    """What every page's header needs: who is signed in, their CSRF token, how to sign in."""
    studio = request.app[STUDIO]
    who = member(request)
    return {"member": who, "csrf_token": who.csrf_token if who else "", "sign_in": studio.settings.sign_in_configured,
            "read_only": None if who else read_only_reason(studio), "request_path": request.path_qs}


async def _gallery(request: web.Request, title: str, known: bool = True, style=None, **fixed) -> web.Response:
    """A gallery page; `known=False` (a name the registry does not have) is a 404 unless it has images."""
    query = _query(request, **fixed)
    studio = request.app[STUDIO]
    items, more = await studio.showcase.gallery(query)
    if not known and not items and query.page == 1:
        raise NotFound(f"There is no {title[0].lower() + title[1:]} here.")
    filters = {parameter: fixed.get(field) for parameter, field in FILTERS.items()}
    hidden = set(studio.showcase.hidden_models())
    catalog = studio.catalog()
    return aiohttp_jinja2.render_template("gallery.html", request, {
        "title": title, "items": [_item_json(i) for i in items], "period": query.period, "periods": PERIOD_TITLES,
        "page": query.page, "per_page": query.per_page, "more": more, "base": request.path,
        "api": "/api/gallery?" + urlencode({k: v for k, v in filters.items() if v}),
        "models": [m["name"] for m in catalog["models"] if m["name"] not in hidden],
        "loras": [lora["name"] for lora in catalog["loras"] if "learned" not in lora["tags"]],
        "house_styles": [lora["name"] for lora in catalog["loras"] if "learned" in lora["tags"]],
        "style": style.to_dict() if style else None,
    })


async def index(request: web.Request) -> web.Response:
    return await _gallery(request, "Community gallery")


async def by_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    studio = request.app[STUDIO]
    known = name in studio.registry.models and name not in studio.showcase.hidden_models()
    return await _gallery(request, f"Model {name}", known, model=name)


async def by_lora(request: web.Request) -> web.Response:
    """A LoRA's images; a learned style's page also shows its version, data and evaluation."""
    name = request.match_info["name"]
    studio = request.app[STUDIO]
    style = None
    if name not in studio.registry.loras:
        try:
            style = await studio.style(name)
        except NotFound:
            pass
    title = f"Learned style {name}" if style else f"LoRA {name}"
    return await _gallery(request, title, name in studio.registry.loras or style is not None, style=style, lora=name)


async def style_picture(request: web.Request) -> web.Response:
    """A learned style's before/after grid or loss curve."""
    data = await request.app[STUDIO].style_picture(request.match_info["name"], request.match_info["picture"])
    return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "public, max-age=3600"})


async def by_member(request: web.Request) -> web.Response:
    user = request.match_info["user"]
    return await _gallery(request, f"Member {user}", False, user_id=user)


async def image_page(request: web.Request) -> web.Response:
    studio = request.app[STUDIO]
    detail = await studio.showcase.image_detail(int(request.match_info["id"]), _viewer_guilds(request))
    who = member(request)
    my_vote = await studio.community.vote_of(detail["id"], who.user_id) if who else 0
    return aiohttp_jinja2.render_template("image.html", request, {"image": detail, "my_vote": my_vote,
                                                                  "settings_json": json.dumps(detail["settings"],
                                                                                              indent=2, default=str)})


def _file_response(path: Path, content_type: str) -> web.FileResponse:
    # Files are content-addressed: a URL's bytes never change. FileResponse adds ETag and Last-Modified.
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable",
                                           "Content-Type": content_type})


async def image_file(request: web.Request) -> web.StreamResponse:
    studio = request.app[STUDIO]
    detail = await studio.showcase.image_detail(int(request.match_info["id"]), _viewer_guilds(request))
    return _file_response(studio.store.path(detail["path"]), "image/png")


async def thumbnail(request: web.Request) -> web.StreamResponse:
    studio = request.app[STUDIO]
    detail = await studio.showcase.image_detail(int(request.match_info["id"]), _viewer_guilds(request))
    target = studio.settings.data_dir / "thumbs" / f"{detail['sha256']}.webp"
    if not target.is_file():
        await asyncio.to_thread(_make_thumbnail, studio.store.path(detail["path"]), target)
    return _file_response(target, "image/webp")


def _make_thumbnail(source: Path, target: Path) -> None:
    """Generated once and stored; small images are kept at their size (the page scales them)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=85)
    temporary = target.with_suffix(f".{os.getpid()}.{secrets.token_hex(6)}.tmp")  # concurrent first requests
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, target)


async def imagine_form(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("imagine.html", request, {"prompt": "", "error": None})


async def imagine_submit(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    prompt = str(form.get("prompt", ""))
    await request.app[LIMITS].hit(request, "imagine", "generations")
    try:
        job = await request.app[STUDIO].submit_imagine(member(request).user_id, prompt)
    except DreamloomError as error:
        response = aiohttp_jinja2.render_template("imagine.html", request, {"prompt": prompt,
                                                                           "error": public_message(error)})
        response.set_status(_status(error))
        return response
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


IMAGE_ACTIONS = {"upscale-detail": ("upscale", "detail"), "upscale-creative": ("upscale", "creative"),
                 "vary-subtle": ("vary", "subtle"), "vary-strong": ("vary", "strong")}


async def image_action(request: web.Request) -> web.StreamResponse:
    """The image page's Upscale and Vary buttons (U and V in Discord)."""
    studio = request.app[STUDIO]
    image_id = int(request.match_info["id"])
    await studio.showcase.image_detail(image_id, _viewer_guilds(request))  # what the visitor cannot see, they cannot use
    action = str((await read_form(request)).get("action", ""))
    if action not in IMAGE_ACTIONS:
        raise InvalidRequest(f"action must be one of {', '.join(IMAGE_ACTIONS)}.")
    await request.app[LIMITS].hit(request, "imagine", "generations")
    kind, mode = IMAGE_ACTIONS[action]
    job = await studio.submit_from_image(member(request).user_id, image_id, kind, mode)
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


async def job_reroll(request: web.Request) -> web.StreamResponse:
    """The job page's Reroll button: the same prompt with new seeds."""
    studio = request.app[STUDIO]
    job_id = int(request.match_info["id"])
    await studio.showcase.public_job(job_id, _viewer_guilds(request))
    await request.app[LIMITS].hit(request, "imagine", "generations")
    job = await studio.submit_reroll(member(request).user_id, job_id)
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


async def job_page(request: web.Request) -> web.Response:
    job = await request.app[STUDIO].showcase.public_job(int(request.match_info["id"]), _viewer_guilds(request))
    who = member(request)
    return aiohttp_jinja2.render_template("job.html", request, {"job": job.to_dict(), "terminal": job.status in TERMINAL,
                                                                "mine": who is not None and job.user_id == who.user_id})


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: queue position, each step with a preview, and the end."""
    studio = request.app[STUDIO]
    job_id = int(request.match_info["id"])
    view = await studio.showcase.public_job(job_id, _viewer_guilds(request))
    await request.app[LIMITS].hit(request, "events", "live progress streams")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(data: dict) -> None:
        await response.write(f"data: {json.dumps(data)}\n\n".encode())

    events = studio.events.subscribe(job_id)
    try:
        await send({"kind": "status", "status": view.status, "position": view.position, "eta": view.eta_seconds})
        while view.status not in TERMINAL:
            try:
                event = await asyncio.wait_for(events.get(), 5)
            except asyncio.TimeoutError:
                view = await studio.job(job_id)  # the job may run in another process
                await send({"kind": "status", "status": view.status, "position": view.position, "eta": view.eta_seconds})
                continue
            preview = base64.b64encode(event.preview_png).decode() if event.preview_png else None
            await send({"kind": event.kind, "step": event.step, "total": event.total, "preview": preview,
                        "message": event.message})
            if event.kind in TERMINAL:
                break
        else:
            await send({"kind": view.status})
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        studio.events.unsubscribe(job_id, events)
    return response


async def api_gallery(request: web.Request) -> web.Response:
    fixed = {field: request.query[parameter] for parameter, field in FILTERS.items() if request.query.get(parameter)}
    items, more = await request.app[STUDIO].showcase.gallery(_query(request, **fixed))
    return web.json_response({"items": [_item_json(i) for i in items], "more": more})


async def api_image(request: web.Request) -> web.Response:
    detail = await request.app[STUDIO].showcase.image_detail(int(request.match_info["id"]), _viewer_guilds(request))
    detail.pop("path")
    return web.json_response(detail)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics, for scrapers on the allowed networks (`metrics_networks`); others get 404."""
    studio = request.app[STUDIO]
    if not address_within(client_address(request), studio.settings.metrics_networks):
        raise web.HTTPNotFound()
    body = database_text(await studio.metrics_snapshot()) + studio.metrics.text()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """For container health checks and load balancers: 200 when the database answers, else 503."""
    healthy = await request.app[STUDIO].healthy()
    return web.json_response({"status": "ok" if healthy else "database unreachable"}, status=200 if healthy else 503)


async def api_job(request: web.Request) -> web.Response:
    job = (await request.app[STUDIO].showcase.public_job(int(request.match_info["id"]), _viewer_guilds(request))).to_dict()
    for image in job["images"]:
        image["path"] = f"/files/{image['id']}.png"
    return web.json_response(job)


async def api_me(request: web.Request) -> web.Response:
    """Who the browser is signed in as (and the CSRF token its scripts send)."""
    who = member(request)
    if who is None:
        return web.json_response({"signed_in": False, "message": read_only_reason(request.app[STUDIO])})
    return web.json_response({"signed_in": who.verified, "user": who.user_id, "name": who.display_name,
                              "csrf_token": who.csrf_token})


async def api_cancel(request: web.Request) -> web.Response:
    """The job page's Cancel button: a queued job at once, a running one at its next step (its owner only)."""
    studio = request.app[STUDIO]
    job_id = int(request.match_info["id"])
    await studio.showcase.public_job(job_id, _viewer_guilds(request))  # what the web cannot see, it cannot cancel either
    view = await studio.cancel(job_id, member(request).user_id)
    return web.json_response({"status": view.status})


async def api_vote(request: web.Request) -> web.Response:
    studio = request.app[STUDIO]
    image_id = int(request.match_info["id"])
    await studio.showcase.image_detail(image_id, _viewer_guilds(request))  # hidden images cannot be voted on either
    body = await read_json(request)
    value = body.get("value") if isinstance(body, dict) else None
    # Exactly 1, -1 or 0: not 1.9, true, "-1" or 1e999 (which used to be taken, or answered 500).
    if type(value) is not int or value not in (1, -1, 0):
        raise InvalidRequest("Send {\"value\": 1, -1 or 0}.")
    await request.app[LIMITS].hit(request, "vote", "votes")
    who = member(request)
    if value == 0:
        up, down = await studio.community.unvote(image_id, who.user_id)
    else:
        up, down = await studio.community.vote(image_id, who.user_id, value, source="web", verified=who.verified)
    return web.json_response({"up": up, "down": down})


async def sign_in(request: web.Request) -> web.StreamResponse:
    """Sign in with Discord: off to Discord's approval page, the `state` kept in a short-lived cookie too."""
    studio = request.app[STUDIO]
    state, url = await studio.sign_in.begin(request.query.get("next", "/"))
    response = web.HTTPFound(url)
    response.set_cookie(SIGN_IN_COOKIE, state, max_age=600, **cookie_options(studio))
    raise response


async def sign_in_callback(request: web.Request) -> web.StreamResponse:
    """Discord sends the browser back here with `code` and `state`; the state must be the one this browser got."""
    studio = request.app[STUDIO]
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if request.query.get("error"):
        raise NotAllowed("Sign-in was cancelled on Discord; nothing changed.")
    if not state or not code or not secrets.compare_digest(state.encode(), request.cookies.get(SIGN_IN_COOKIE, "").encode()):
        raise NotAllowed("This sign-in did not start in this browser (or took too long); sign in again.")
    token, return_to = await studio.sign_in.finish(state, code)
    response = web.HTTPSeeOther(return_to)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(studio.settings.web_session_days * 86400),
                        **cookie_options(studio))
    response.del_cookie(SIGN_IN_COOKIE, path="/")
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    """Sign out (a form with the CSRF token, so another site cannot sign a member out)."""
    await request.app[STUDIO].sign_in.sign_out(request.cookies.get(SESSION_COOKIE, ""))
    response = web.HTTPSeeOther("/")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


STATIC = Path(__file__).parent / "static"
FAVICON = (STATIC / "favicon.svg").read_bytes()


async def favicon(request: web.Request) -> web.Response:
    return web.Response(body=FAVICON, content_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


async def script(request: web.Request) -> web.Response:
    """The pages' scripts (served from files: the Content-Security-Policy allows no inline script)."""
    name = request.match_info["name"]
    path = STATIC / f"{name}.js"
    if not path.is_file():
        raise NotFound("There is no such script.")
    return web.Response(body=path.read_bytes(), content_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=300"})


def create_app(studio: Studio) -> web.Application:
    """The gallery application over `studio`."""
    app = web.Application(middlewares=[security_headers, errors, identity, csrf], client_max_size=64 * 1024)
    app[STUDIO] = studio
    app[LIMITS] = RateLimits(studio.settings)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                         context_processors=[_page_context])
    number = r"{id:[0-9]{1,12}}"
    app.add_routes([
        web.get("/", index),
        web.get("/healthz", healthz),
        web.get("/metrics", metrics),
        web.get("/favicon.svg", favicon),
        web.get("/favicon.ico", favicon),  # asked for by browsers and tools that do not read the page's <link>
        web.get("/static/{name:[a-z]{1,20}}.js", script),
        web.get("/model/{name:[A-Za-z0-9._-]{1,200}}", by_model),
        web.get("/lora/{name:[A-Za-z0-9._-]{1,200}}", by_lora),
        web.get("/styles/{name:[A-Za-z0-9._-]{1,200}}/{picture:before-after|loss}.png", style_picture),
        web.get("/member/{user:[A-Za-z0-9:._-]{1,100}}", by_member),
        web.get(f"/image/{number}", image_page),
        web.post(f"/image/{number}/make", image_action),
        web.get(f"/files/{number}.png", image_file),
        web.get(f"/thumbs/{number}.webp", thumbnail),
        web.get("/imagine", imagine_form),
        web.post("/imagine", imagine_submit),
        web.get(f"/jobs/{number}", job_page),
        web.post(f"/jobs/{number}/reroll", job_reroll),
        web.get(f"/jobs/{number}/events", job_events),
        web.get("/sign-in", sign_in),
        web.get(CALLBACK_PATH, sign_in_callback),
        web.post("/sign-out", sign_out),
        web.get("/api/me", api_me),
        web.get("/api/gallery", api_gallery),
        web.get(f"/api/images/{number}", api_image),
        web.get(f"/api/jobs/{number}", api_job),
        web.post(f"/api/images/{number}/vote", api_vote),
        web.post(f"/api/jobs/{number}/cancel", api_cancel),
    ])
    return app


async def start_gallery(studio: Studio, settings, announce=print):
    """Serve the gallery on the configured address (a `serve` front door); returns its cleanup."""
    await studio.prepare_routing()
    # keepalive_timeout also closes a connection whose request headers are not complete in time (aiohttp starts
    # that clock when the connection opens and after each answer): silent and slow clients alike.
    runner = web.AppRunner(create_app(studio), access_log=None, keepalive_timeout=settings.web_idle_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, settings.gallery_host, settings.gallery_port).start()
    announce(f"dreamloom gallery: http://{settings.gallery_host}:{settings.gallery_port}/")
    if not settings.sign_in_configured and not settings.web_allow_anonymous:
        announce("the web gallery is read-only: set DREAMLOOM_DISCORD_CLIENT_ID and _CLIENT_SECRET for Sign in with "
                 "Discord (README: Running it in public)")
    return runner.cleanup
