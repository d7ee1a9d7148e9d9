"""The web UI: static files (HTML, CSS, ES modules in `static/`) that the REST app serves at `/`.

No build step and no framework: the browser loads `static/app.js` as an ES module, which routes
on the URL's hash and calls only the /v1 API with the session cookie (ARCHITECTURE.md: Web UI)."""
