"""A run that stops at ingest starts fast: neither its driver nor the Ray workers that run its
parts import torch, timm or faiss (seconds of imports and a gigabyte of memory each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from tests.http_server import ServedSite
from tests.images import jpeg

HEAVY = ("torch", "torchvision", "timm", "faiss")

# `curate run` as a user runs it, with the ingest stage wrapped so that every part, on the worker
# that ran it, writes down which heavy modules that worker holds once the part is done.
DRIVER = f"""
import json, sys
from pathlib import Path

import pipelines.registry as registry
from services.cli.main import main

HEAVY = {HEAVY!r}
REPORTS = Path(sys.argv[1])


def reporting(stage):
    base = type(stage)

    def run_part(self, state, part):
        result = base.run_part(self, state, part)
        loaded = sorted(name for name in HEAVY if name in sys.modules)
        (REPORTS / f"part-{{part.index}}.json").write_text(json.dumps(loaded))
        return result

    cls = type("Reporting" + base.__name__, (base,), {{"run_part": run_part}})
    clone = object.__new__(cls)
    clone.__dict__.update(vars(stage))
    return clone


load = registry.load_stage
registry.load_stage = lambda name: reporting(load(name)) if name == "ingest" else load(name)
code = main(sys.argv[2:])
print(json.dumps({{"code": code, "driver": sorted(n for n in HEAVY if n in sys.modules)}}))
"""


def _images(site: ServedSite) -> list[web.RouteDef]:
    async def image(request: web.Request) -> web.Response:
        body = jpeg(120, 100, seed=int(request.match_info["n"]))
        return web.Response(body=body, content_type="image/jpeg")

    return [web.get("/img/{n}.jpg", image)]


def test_an_ingest_only_run_imports_no_torch_timm_or_faiss(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {
        **os.environ,
        "CURATE_DATA_ROOT": str(tmp_path / "data"),
        "CURATE_PROGRESS": "0",
        "CURATE_ALLOW_PRIVATE_NETWORKS": "1",
        "CURATE_NUM_CPUS": "2",
    }
    env.pop("CURATE_RAY_ADDRESS", None)  # its own local Ray, started by the run as a user's is
    with ServedSite(_images) as site:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(site.url(f"/img/{n}.jpg") + "\n" for n in range(6)))
        run = ["run", "--source", str(urls), "--job", "j", "--until", "ingest", "--shard-size", "3"]
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, str(reports), *run],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 0, "driver": []}
    # Both parts ran, each on a worker that loaded none of them.
    parts = {p.name: json.loads(p.read_text()) for p in reports.iterdir()}
    assert parts == {"part-0.json": [], "part-1.json": []}
