"""GET /docs: Swagger UI from the assets the fastapi-swagger package installs, not from a CDN, so
the page works on a host without internet. (ReDoc has no such package and is off.)

The page and its assets carry the headers of the page at / (service.api.routes.page), with a
policy that differs in two places only: Swagger UI's one inline script, which starts it, is
allowed by its hash, and its stylesheet's images are data: URIs.
"""

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from service.api.routes.page import security_headers

ASSETS = "/docs/assets"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
router = APIRouter(include_in_schema=False)


class _Assets(StaticFiles):
    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(security_headers())
        return response


assets = _Assets(directory=str(files("fastapi_swagger") / "resources"))


def content_security_policy(page: bytes) -> str:
    """The page's policy: scripts from this origin and the page's own inline scripts, by hash."""
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                     for script in _INLINE_SCRIPT.findall(page))
    return (f"default-src 'none'; script-src 'self'{hashes}; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(openapi_url=root + request.app.openapi_url,
                               title=f"{request.app.title}: API",
                               swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png")
    page.headers.update(security_headers(content_security_policy(page.body)))
    return page
