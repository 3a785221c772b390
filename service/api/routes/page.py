"""GET /: the page for a person trying a model (issue 14), and its assets under /web/.

The page is static HTML, CSS and JavaScript modules of the project's own (service/web/, no
library, no build step) that call the API from the browser, same origin only. The files are read
once at import and served from memory: a request names a file of that fixed set or gets 404, so no
path reaches the file system. Every response carries a Content-Security-Policy that allows
scripts, styles and requests from this origin only, and neither inline scripts nor inline styles.
"""

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

ASSETS = "/web"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str


def _read_files() -> dict[str, _File]:
    folder = files("service") / "web"
    out = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in _MEDIA_TYPES:
            body = entry.read_bytes()
            out[entry.name] = _File(body, _MEDIA_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


_FILES = _read_files()


def security_headers(policy: str = CONTENT_SECURITY_POLICY) -> dict[str, str]:
    """The headers of every page and asset served to a browser (here and /docs): its policy,
    which also forbids framing (frame-ancestors), no MIME sniffing, no referrer."""
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _serve(request: Request, name: str) -> Response:
    file = _FILES.get(name)
    if file is None:
        raise HTTPException(404, f"{ASSETS}/{name}: no such file")
    headers = {**security_headers(), "Cache-Control": "no-cache", "ETag": file.etag}
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


@router.get("/")
async def page(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get(ASSETS + "/{name}")
async def asset(request: Request, name: str) -> Response:
    return _serve(request, name)


@router.get("/favicon.ico")
async def favicon() -> Response:
    """Browsers ask for it on every page view: no icon, said once a day (204), not a 404."""
    return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})
