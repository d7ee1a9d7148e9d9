"""Who may call the service: tokens and their scopes, revocation, the UI's session cookie, and
auth switched off explicitly (`curate serve --no-auth`)."""

import json
import os
import socket
import stat
import subprocess
import sys
import time

import httpx

from curate.catalog import Catalog
from curate.settings import Settings
from services.api.settings import ServiceSettings
from tests.service import curate_cli, serve


def test_requests_need_a_token_and_writes_a_write_token(api_server, read_token):
    anonymous = api_server.client()
    health = anonymous.get("/v1/health")
    assert health.status_code == 200 and health.json()["auth"] is True
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/jobs/demo"), ("POST", "/v1/jobs")]:
        response = anonymous.request(method, path, json={})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "unauthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = api_server.client("curate_not-a-token").get("/v1/jobs")
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["error"]["message"]

    reader = api_server.client(read_token)
    assert reader.get("/v1/jobs").status_code == 200
    refused = reader.post("/v1/jobs", json={"source": "/nowhere"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert reader.delete("/v1/jobs/anything").status_code == 403


def test_tokens_from_the_cli_are_hashed_and_revocable(api_server):
    data_root = api_server.settings.data_root
    created = curate_cli("tokens", "create", "--scope", "read", "--name", "ci", data_root=data_root)
    token_id, secret = created.stdout.split()[1], created.stdout.split(":", 1)[1].split()[0]
    assert secret.startswith("curate_")
    _, rows = api_server.catalog.query("SELECT sha256 FROM api_tokens")
    assert secret not in str(rows), "only the token's hash is stored"

    client = api_server.client(secret)
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/v1/jobs").status_code == 200  # the second look-up from the cache
    listing = curate_cli("tokens", "list", data_root=data_root).stdout
    assert token_id in listing and "ci" in listing and secret not in listing

    curate_cli("tokens", "revoke", token_id, data_root=data_root)
    revoked = client.get("/v1/jobs")
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "unauthenticated"
    unknown = curate_cli("tokens", "revoke", "tok-missing", data_root=data_root, check=False)
    assert unknown.returncode == 2 and "no token 'tok-missing'" in unknown.stderr


def test_the_local_token_is_kept_and_reused_until_revoked(tmp_path):
    """`make serve` prints `curate tokens local`: the same token on every run, kept where only
    its owner can read it, and a new one once it is revoked or exposed."""
    data_root = tmp_path / "data"

    def local() -> dict:
        return json.loads(curate_cli("tokens", "local", "--json", data_root=data_root).stdout)

    first = local()
    assert first["scope"] == "write" and not first["reused"]
    kept = data_root / "catalog.duckdb.serve-token"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_text().strip() == first["token"]
    second = local()
    assert second["reused"] and second["token"] == first["token"]
    assert second["token_id"] == first["token_id"]
    assert curate_cli("tokens", "local", data_root=data_root).stdout.strip() == first["token"]

    curate_cli("tokens", "revoke", first["token_id"], data_root=data_root)
    third = local()
    assert not third["reused"] and third["token"] != first["token"]
    catalog = Catalog(data_root / "catalog.duckdb", data_root)
    assert catalog.token_for(third["token"])["token_id"] == third["token_id"]

    kept.chmod(0o644)  # readable by others: maybe leaked, so revoked and replaced
    fourth = local()
    assert not fourth["reused"] and fourth["token"] != third["token"]
    assert catalog.token_for(third["token"]) is None
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert [t["name"] for t in catalog.tokens()] == ["local"] * 3


def test_the_session_cookie_signs_the_ui_in_and_out(api_server, read_token):
    with api_server.client() as browser:
        bad = browser.post("/v1/session", json={"token": "curate_wrong"})
        assert bad.status_code == 401 and not browser.cookies
        signed_in = browser.post("/v1/session", json={"token": read_token})
        assert signed_in.status_code == 204
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/v1/jobs").status_code == 200
        assert browser.post("/v1/jobs", json={}).status_code == 403, "the cookie keeps the scope"
        assert browser.delete("/v1/session").status_code == 204
        assert browser.get("/v1/jobs").status_code == 401


def test_no_auth_serves_everyone(tmp_path):
    settings = Settings(data_root=tmp_path / "data", progress=False)
    with serve(settings, ServiceSettings(port=0, auth=False)) as server:
        anonymous = server.client()
        assert anonymous.get("/v1/health").json()["auth"] is False
        assert anonymous.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
        refused = anonymous.post("/v1/jobs", json={"source": str(tmp_path)})
        assert refused.status_code == 422, "no source roots: no local path may be read"
        assert refused.json()["error"]["field"] == "body.source"


def free_port() -> int:
    """A port that was free a moment ago, for a server in another process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_curate_serve_binds_localhost_and_answers(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "serve", "--port", str(port), "--no-auth"],
        env={**os.environ, "CURATE_DATA_ROOT": str(tmp_path / "data")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "curate serve did not answer"
                time.sleep(0.2)
        assert health.json()["auth"] is False
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200, "the UI at /"
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in stderr and "NO AUTH" in stderr
