"""The pages a browser opens: the playground at `GET /` (and `/ui`), which drives `/v1/jobs`, and ReDoc.

The page is plain HTML, CSS and JavaScript under `static/`, served by the server itself: no CDN, no build step.
It holds no secret, so it is served without the API key; with API_KEY set, the visitor types the key into the
page, which keeps it in the browser (localStorage) and sends it as `Authorization: Bearer`, and reads each job's
events through the token in its `events_url`. Only GET answers the page: `POST /` stays the legacy API.

The API docs need no CDN either: `/docs` (Swagger UI) comes from fastapi_offline (app.py), which serves Swagger UI's
and ReDoc's files from the installed package; `/redoc` is served here, over the same ReDoc file, because ReDoc's
bundle fetches Redocly's logo from their CDN and only a Content-Security-Policy keeps the page from asking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC_DIR = Path(__file__).parent / "static"
STATIC_URL = "/ui/static"
DOCS_FILES_URL = "/static-offline-docs"  # where fastapi_offline serves its files (its default `static_url`)

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
@router.get("/ui")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_FILES_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_FILES_URL}/favicon.png",
        with_google_fonts=False,
    )
    # Images from this server only: the bundle's footer shows Redocly's logo from their CDN (and hides it when it
    # does not load). The bundle draws its own images from data: and blob: URLs.
    page.headers["Content-Security-Policy"] = "img-src 'self' data: blob:"
    return page


class _RevalidatedFiles(StaticFiles):
    """The page's files, revalidated on each load (a 304 while unchanged), so that an upgraded server never
    runs with last version's script in a browser's cache."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install(app: FastAPI) -> None:
    """Serve the page and its files on `app`. A router cannot carry a mount, hence this function."""
    app.include_router(router)
    app.mount(STATIC_URL, _RevalidatedFiles(directory=STATIC_DIR), name="playground")
