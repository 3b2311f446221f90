"""The `/v1` routers: every OpenAI-compatible route, added to the app by `api/main.py`."""

from __future__ import annotations

from api.compat import batches, chat, files, models, responses

routers = (models.router, responses.router, chat.router, files.router, batches.router)
