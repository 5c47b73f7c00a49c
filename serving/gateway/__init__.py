"""The OpenAI-compatible gateway: a raw ASGI app in front of the engine workers.

The hot path (`app.Gateway`) touches neither Django's request machinery nor the database: it reads an
in-memory route table (`routing`) that a background task rebuilds from the database when
`RouteGeneration` changes (`table`), measures each response as it streams past (`meter`), and hands a
request record to a bounded buffer that a background task writes in batches (`records`). Shadow
mirrors go to Celery after the response is served (`shadow`, `serving.tasks`).
"""
