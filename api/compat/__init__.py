"""The OpenAI-compatible door under `/v1`: the official `openai` SDK works with `base_url=<AIQ>/v1`.

The routes are thin adapters over the same services as the native API (one row per query, one lifecycle,
one set of limits); `router.py` mounts them, `errors.py` renders errors in OpenAI's shape.
"""
