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

from dreamloom.errors import DreamloomError, InvalidRequest, NotAllowed, NotFound

from studio.service import TERMINAL, GalleryQuery, Studio

log = logging.getLogger(__name__)
STUDIO = web.AppKey("studio", Studio)
COOKIE = "dreamloom_web"
THUMBNAIL_SIDE = 256
PERIOD_TITLES = {"day": "Today", "week": "This week", "all": "All time", "new": "Newest"}
FILTERS = {"model": "model", "lora": "lora", "user": "user_id"}  # JSON API query parameter -> GalleryQuery field


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


@web.middleware
async def errors(request: web.Request, handler):
    """The one handler that turns studio errors into 404 / 400 answers (JSON under /api, HTML elsewhere)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DreamloomError as error:
        status = 404 if isinstance(error, NotFound) else 403 if isinstance(error, NotAllowed) else 400
        if _wants_json(request):
            return web.json_response({"error": str(error)}, status=status)
        response = aiohttp_jinja2.render_template("error.html", request, {"message": str(error), "status": status})
        response.set_status(status)
        return response


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # No framing (clickjacking), no plugins, no <base> tricks; scripts are still inline, so no script-src yet.
    "Content-Security-Policy": "frame-ancestors 'none'; object-src 'none'; base-uri 'none'",
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


@web.middleware
async def web_identity(request: web.Request, handler):
    """A random cookie identifies a web visitor (`web:<id>`) for votes and the imagine form."""
    token = request.cookies.get(COOKIE)
    fresh = not token or not token.isalnum() or len(token) > 64
    request["user_id"] = "web:" + (secrets.token_hex(8) if fresh else token)[:16]
    response = await handler(request)
    if fresh and isinstance(response, web.StreamResponse) and not response.prepared:
        response.set_cookie(COOKIE, request["user_id"][4:], max_age=10 * 365 * 86400, httponly=True, samesite="Lax")
    return response


def _int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name, str(default))
    if not re.fullmatch(r"[0-9]{1,6}", value):  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
        raise InvalidRequest(f"{name} must be a whole number; got {value[:20]!r}.")
    return int(value)


def _query(request: web.Request, **fixed) -> GalleryQuery:
    period = request.query.get("period", "day")
    return GalleryQuery(period=period, page=_int(request, "page", 1), per_page=_int(request, "per_page", 24), **fixed).check()


def _item_json(item) -> dict:
    return {"id": item.image_id, "job_id": item.job_id, "prompt": item.prompt, "model": item.model, "user": item.user_id,
            "up": item.up, "down": item.down, "score": round(item.score, 4), "width": item.width, "height": item.height,
            "created_at": item.created_at.isoformat(), "url": f"/image/{item.image_id}",
            "thumbnail": f"/thumbs/{item.image_id}.webp", "file": f"/files/{item.image_id}.png"}


async def _gallery(request: web.Request, title: str, known: bool = True, **fixed) -> web.Response:
    """A gallery page; `known=False` (a name the registry does not have) is a 404 unless it has images."""
    query = _query(request, **fixed)
    studio = request.app[STUDIO]
    items, more = await studio.gallery(query)
    if not known and not items and query.page == 1:
        raise NotFound(f"There is no {title[0].lower() + title[1:]} here.")
    filters = {parameter: fixed.get(field) for parameter, field in FILTERS.items()}
    hidden = set(studio.hidden_models())
    catalog = studio.catalog()
    return aiohttp_jinja2.render_template("gallery.html", request, {
        "title": title, "items": [_item_json(i) for i in items], "period": query.period, "periods": PERIOD_TITLES,
        "page": query.page, "per_page": query.per_page, "more": more, "base": request.path,
        "api": "/api/gallery?" + urlencode({k: v for k, v in filters.items() if v}),
        "models": [m["name"] for m in catalog["models"] if m["name"] not in hidden],
        "loras": [lora["name"] for lora in catalog["loras"]],
    })


async def index(request: web.Request) -> web.Response:
    return await _gallery(request, "Community gallery")


async def by_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    studio = request.app[STUDIO]
    known = name in studio.registry.models and name not in studio.hidden_models()
    return await _gallery(request, f"Model {name}", known, model=name)


async def by_lora(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return await _gallery(request, f"LoRA {name}", name in request.app[STUDIO].registry.loras, lora=name)


async def by_member(request: web.Request) -> web.Response:
    user = request.match_info["user"]
    return await _gallery(request, f"Member {user}", False, user_id=user)


async def image_page(request: web.Request) -> web.Response:
    studio = request.app[STUDIO]
    detail = await studio.image_detail(int(request.match_info["id"]))
    my_vote = await studio.vote_of(detail["id"], request["user_id"])
    return aiohttp_jinja2.render_template("image.html", request, {"image": detail, "my_vote": my_vote,
                                                                  "settings_json": json.dumps(detail["settings"],
                                                                                              indent=2, default=str)})


def _file_response(path: Path, content_type: str) -> web.FileResponse:
    # Files are content-addressed: a URL's bytes never change. FileResponse adds ETag and Last-Modified.
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable",
                                           "Content-Type": content_type})


async def image_file(request: web.Request) -> web.StreamResponse:
    studio = request.app[STUDIO]
    detail = await studio.image_detail(int(request.match_info["id"]))
    return _file_response(studio.store.path(detail["path"]), "image/png")


async def thumbnail(request: web.Request) -> web.StreamResponse:
    studio = request.app[STUDIO]
    detail = await studio.image_detail(int(request.match_info["id"]))
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
    form = await request.post()
    prompt = str(form.get("prompt", ""))
    try:
        job = await request.app[STUDIO].submit_imagine(request["user_id"], prompt)
    except DreamloomError as error:
        response = aiohttp_jinja2.render_template("imagine.html", request, {"prompt": prompt, "error": str(error)})
        response.set_status(400)
        return response
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


async def job_page(request: web.Request) -> web.Response:
    job = await request.app[STUDIO].public_job(int(request.match_info["id"]))
    return aiohttp_jinja2.render_template("job.html", request, {"job": job.to_dict(), "terminal": job.status in TERMINAL,
                                                                "mine": job.user_id == request["user_id"]})


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: queue position, each step with a preview, and the end."""
    studio = request.app[STUDIO]
    job_id = int(request.match_info["id"])
    view = await studio.public_job(job_id)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(data: dict) -> None:
        await response.write(f"data: {json.dumps(data)}\n\n".encode())

    events = studio.subscribe(job_id)
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
        studio.unsubscribe(job_id, events)
    return response


async def api_gallery(request: web.Request) -> web.Response:
    fixed = {field: request.query[parameter] for parameter, field in FILTERS.items() if request.query.get(parameter)}
    items, more = await request.app[STUDIO].gallery(_query(request, **fixed))
    return web.json_response({"items": [_item_json(i) for i in items], "more": more})


async def api_image(request: web.Request) -> web.Response:
    detail = await request.app[STUDIO].image_detail(int(request.match_info["id"]))
    detail.pop("path")
    return web.json_response(detail)


async def api_job(request: web.Request) -> web.Response:
    job = (await request.app[STUDIO].public_job(int(request.match_info["id"]))).to_dict()
    for image in job["images"]:
        image["path"] = f"/files/{image['id']}.png"
    return web.json_response(job)


async def api_cancel(request: web.Request) -> web.Response:
    """The job page's Cancel button: a queued job at once, a running one at its next step (its owner only)."""
    studio = request.app[STUDIO]
    job_id = int(request.match_info["id"])
    await studio.public_job(job_id)  # what the web cannot see, it cannot cancel either
    if request.content_type != "application/json":
        raise InvalidRequest("Send the request as JSON.")  # a plain cross-site form cannot
    view = await studio.cancel(job_id, request["user_id"])
    return web.json_response({"status": view.status})


async def api_vote(request: web.Request) -> web.Response:
    studio = request.app[STUDIO]
    image_id = int(request.match_info["id"])
    await studio.image_detail(image_id)  # hidden images cannot be voted on from the web either
    try:
        value = (await request.json()).get("value")
    except (ValueError, TypeError, AttributeError):
        value = None
    # Exactly 1, -1 or 0: not 1.9, true, "-1" or 1e999 (which used to be taken, or answered 500).
    if type(value) is not int or value not in (1, -1, 0):
        raise InvalidRequest("Send {\"value\": 1, -1 or 0}.")
    if value == 0:
        up, down = await studio.unvote(image_id, request["user_id"])
    else:
        up, down = await studio.vote(image_id, request["user_id"], value, source="web")
    return web.json_response({"up": up, "down": down})


FAVICON = (Path(__file__).parent / "static" / "favicon.svg").read_bytes()


async def favicon(request: web.Request) -> web.Response:
    return web.Response(body=FAVICON, content_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})


def create_app(studio: Studio) -> web.Application:
    """The gallery application over `studio`."""
    app = web.Application(middlewares=[security_headers, web_identity, errors], client_max_size=64 * 1024)
    app[STUDIO] = studio
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)
    number = r"{id:[0-9]{1,12}}"
    app.add_routes([
        web.get("/", index),
        web.get("/favicon.svg", favicon),
        web.get("/favicon.ico", favicon),  # asked for by browsers and tools that do not read the page's <link>
        web.get("/model/{name:[A-Za-z0-9._-]{1,200}}", by_model),
        web.get("/lora/{name:[A-Za-z0-9._-]{1,200}}", by_lora),
        web.get("/member/{user:[A-Za-z0-9:._-]{1,100}}", by_member),
        web.get(f"/image/{number}", image_page),
        web.get(f"/files/{number}.png", image_file),
        web.get(f"/thumbs/{number}.webp", thumbnail),
        web.get("/imagine", imagine_form),
        web.post("/imagine", imagine_submit),
        web.get(f"/jobs/{number}", job_page),
        web.get(f"/jobs/{number}/events", job_events),
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
    runner = web.AppRunner(create_app(studio), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.gallery_host, settings.gallery_port).start()
    announce(f"dreamloom gallery: http://{settings.gallery_host}:{settings.gallery_port}/")
    return runner.cleanup
