"""GET /docs: Swagger UI from the assets the fastapi-swagger package installs, not from a CDN, so
the page works on a host without internet. (ReDoc has no such package and is off.)"""

from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
router = APIRouter(include_in_schema=False)
assets = StaticFiles(directory=str(files("fastapi_swagger") / "resources"))


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url,
                               title=f"{request.app.title}: API",
                               swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png")
