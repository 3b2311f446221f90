"""P1: the textbook FastAPI + Celery stack AIQ is measured against.

What a competent engineer writes from the FastAPI and Celery tutorials, with every default left alone:
sync `def` endpoints (FastAPI runs them on its 40-thread pool), sync SQLAlchemy ORM sessions over
psycopg2 (pool 5 + 10 overflow per process), `task.delay()` after commit, Celery's prefork pool with
concurrency = cores and prefetch 4, a Redis result backend, and the sync `openai` client inside the
task. Auth is the same bearer JWT check as AIQ's (signature only, no database lookup), so the comparison
is about the architecture, not about an extra query. It has its own table (`naive_queries`, created with
`create_all`, as the tutorials do) and its own queue. Configured only through `NAIVE_*` variables and
`OPENAI_BASE_URL` / `OPENAI_API_KEY`.
"""
