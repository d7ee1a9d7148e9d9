"""The REST service (FastAPI): `create_app` in app.py; one router module per area (jobs, sets,
results, images), the job manager, server-sent events, auth and the service's settings."""
