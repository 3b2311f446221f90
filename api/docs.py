"""`/docs` (Swagger UI) and `/redoc` served from the package: no CDN, no web fonts, works offline.

The assets in `api/static/` come unmodified from npm's `swagger-ui-dist` (Apache-2.0) and `redoc` (MIT),
each next to its licence; their versions are in `api/static/README.md`. The pages load nothing but
same-origin files, so the Content-Security-Policy of `api.middleware.DOCS_CSP` allows only 'self' (plus
inline styles, which both renderers set).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/docs"

_SWAGGER_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>AIQ - Swagger UI</title>
<link rel="icon" type="image/png" href="{STATIC_PREFIX}/swagger-ui/favicon-32x32.png">
<link rel="stylesheet" href="{STATIC_PREFIX}/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{STATIC_PREFIX}/swagger-ui/swagger-ui-bundle.js"></script>
<script src="{STATIC_PREFIX}/swagger-init.js"></script>
</body>
</html>
"""

_REDOC_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>AIQ - ReDoc</title>
<link rel="icon" type="image/png" href="{STATIC_PREFIX}/swagger-ui/favicon-32x32.png">
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="{STATIC_PREFIX}/redoc/redoc.standalone.js"></script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Mount the assets and the two pages; create the app with `docs_url=None, redoc_url=None`."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(_SWAGGER_PAGE)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return HTMLResponse(_REDOC_PAGE)
