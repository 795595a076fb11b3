"""`/docs`: Swagger UI over `/openapi.json`. Its script and stylesheet come from the jsdelivr
CDN, pinned to one release and checked by the browser against their hashes (subresource
integrity), under a policy that lets the page talk to this server only."""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

#: swagger-ui-dist's release; the hashes are sha384 of its files as npm ships them.
SWAGGER_UI: Final = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.36.0"
SCRIPT_INTEGRITY: Final = "sha384-fUpRgC19yPykTqzdrUbdAg8NTiu16NEKf9U12J+IJWCg8/1mEI8f2+PEIz60Wyd+"
STYLE_INTEGRITY: Final = "sha384-z/AtSaOHGn5MJ5auAHXUypohywlIWLBZo1jeGmhdpVIbCnFhxAH92cwdV41oyINc"

_START: Final = (
    'SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", '
    'presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});'
)
_START_HASH: Final = base64.b64encode(hashlib.sha256(_START.encode()).digest()).decode()

#: The CDN's scripts and the page's one inline script; requests to this server only (a
#: script gone bad could not send what it reads elsewhere); no frames, no forms.
POLICY: Final = (
    f"default-src 'none'; script-src https://cdn.jsdelivr.net 'sha256-{_START_HASH}'; "
    "style-src https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

PAGE: Final = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>oncelery API</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css" integrity="{STYLE_INTEGRITY}"
      crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js" integrity="{SCRIPT_INTEGRITY}"
        crossorigin="anonymous"></script>
<script>{_START}</script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def docs() -> HTMLResponse:
    """The API's documentation, for people."""
    headers = {
        "Content-Security-Policy": POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(PAGE, headers=headers)
