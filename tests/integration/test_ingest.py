"""The ingest stage end to end: real Ray, a real DuckDB catalog, real files and HTTP."""

import asyncio
import json

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from curate.catalog import Catalog, JobConflict
from curate.settings import CrawlSettings
from pipelines.job import run_job
from schemas.job import parse_job_spec
from tests.corpus import (
    webdataset_samples,
    write_folder,
    write_hf_parquet,
    write_img2dataset_parquet,
    write_tar,
)
from tests.http_server import ServedSite
from tests.images import encode, jpeg, photo, truncated_jpeg


def run(settings, source, job="j", **ingest):
    spec = {"source": str(source), "job_id": job, "ingest": ingest, "until": "ingest"}
    spec = parse_job_spec(spec)
    return run_job(spec, settings, log=lambda _: None)


def query(settings, sql):
    return Catalog(settings.catalog_file, settings.data_root).query(sql)[1]


def test_folder_job_records_images_errors_and_duplicates(ray_local, settings, tmp_path):
    root = tmp_path / "crawl"
    paths = write_folder(root, 10)
    (root / "broken").mkdir()
    (root / "broken" / "page.jpg").write_bytes(b"<html>nope</html>")
    (root / "broken" / "cut.jpg").write_bytes(truncated_jpeg())
    (root / "broken" / "tiny.png").write_bytes(encode(photo(20, 20), "PNG"))
    (root / "zz-copy.jpg").write_bytes(paths[3].read_bytes())  # exact duplicate, later part
    report = run(settings, root, shard_size=4)

    (stage,) = report["stages"]
    assert report["status"] == "done" and stage["status"] == "done"
    assert stage["parts_done"] == stage["parts_total"] == 4
    assert (stage["rows_in"], stage["rows_out"], stage["errors"]) == (14, 11, 3)
    assert stage["errors_by_reason"] == {"decode_error": 1, "not_an_image": 1, "too_small": 1}
    assert stage["metrics"]["images"] == 10 and stage["metrics"]["exact_duplicates"] == 1

    assert query(settings, 'SELECT count(*) FROM "j".ingest') == [(10,)]
    (dup,) = query(settings, 'SELECT uri, duplicate_of FROM "j".ingest_duplicates')
    assert dup == (str((root / "zz-copy.jpg").resolve()), str(paths[3].resolve()))
    errors = dict(query(settings, 'SELECT reason, uri FROM "j".ingest_errors'))
    assert errors["not_an_image"].endswith("page.jpg")

    shard = settings.job_dir("j") / "ingest" / "part-000000.parquet"
    table = pq.read_table(shard)
    row = table.to_pylist()[0]
    assert row["image"]["bytes"] == open(row["uri"], "rb").read(), "original bytes kept"
    assert row["image"]["path"] == f"{row['image_id']}.jpg"


def test_rerun_of_a_finished_job_redoes_nothing(ray_local, settings, tmp_path):
    write_folder(tmp_path / "c", 6)
    first = run(settings, tmp_path / "c", shard_size=2)
    shard = settings.job_dir("j") / "ingest" / "part-000000.parquet"
    written = shard.stat().st_mtime_ns
    again = run(settings, tmp_path / "c", shard_size=2)
    assert shard.stat().st_mtime_ns == written
    assert again["stages"][0]["rows_out"] == first["stages"][0]["rows_out"] == 6
    with pytest.raises(JobConflict):
        run(settings, tmp_path / "c", shard_size=3)


def test_every_local_source_kind(ray_local, settings, tmp_path):
    images = [jpeg(100, 100, seed=50 + i) for i in range(5)]
    write_tar(tmp_path / "wds" / "a.tar", webdataset_samples(3))
    write_tar(tmp_path / "wds" / "b.tar", webdataset_samples(2, start_seed=10))
    cases = {
        "glob": (tmp_path / "g" / "**" / "*.jpg", 4),
        "tar": (tmp_path / "wds" / "*.tar", 5),
        "hf": (write_hf_parquet(tmp_path / "hf.parquet", images), 5),
        "i2d": (write_img2dataset_parquet(tmp_path / "i2d.parquet", images[:2] + [None]), 2),
    }
    write_folder(tmp_path / "g", 4)
    for job, (source, expected) in cases.items():
        report = run(settings, source, job=job, shard_size=2)
        assert report["stages"][0]["rows_out"] == expected, job
    (caption,) = query(
        settings,
        """SELECT metadata->>'txt' FROM "tar".ingest WHERE uri LIKE '%a.tar#shard/00001.jpg'""",
    )
    assert caption == ("caption 1",)
    assert query(settings, 'SELECT reason FROM "i2d".ingest_errors') == [("empty",)]


def crawl_routes(site: ServedSite, other: ServedSite):
    async def image(request):
        return web.Response(
            body=jpeg(120, 100, seed=int(request.match_info["n"])), content_type="image/jpeg"
        )

    async def flaky(request):
        if site.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        return web.Response(body=jpeg(120, 100, seed=77), content_type="image/jpeg")

    async def slow(request):
        await asyncio.sleep(3)
        return web.Response(body=jpeg(seed=78), content_type="image/jpeg")

    def fixed(body, status=200, content_type="image/jpeg", headers=None):
        async def handler(request):
            return web.Response(
                body=body, status=status, content_type=content_type, headers=headers
            )

        return handler

    def redirect(target):
        async def handler(request):
            raise web.HTTPFound(target())

        return handler

    return [
        web.get("/img/{n}.jpg", image),
        web.get("/flaky.jpg", flaky),
        web.get("/slow.jpg", slow),
        web.get("/missing.jpg", fixed(b"gone", status=404, content_type="text/plain")),
        web.get("/error.jpg", fixed(b"boom", status=500, content_type="text/plain")),
        web.get("/loop/a", redirect(lambda: "/loop/b")),
        web.get("/loop/b", redirect(lambda: "/loop/a")),
        web.get("/elsewhere", redirect(lambda: other.url("/img/999.jpg"))),
        web.get("/huge.jpg", fixed(b"\xff" * 300_000)),
        web.get("/page.html", fixed(b"<html><body>hi</body></html>", content_type="text/html")),
        web.get("/truncated.jpg", fixed(truncated_jpeg())),
        web.get("/noai.jpg", fixed(jpeg(seed=79), headers={"X-Robots-Tag": "noai"})),
        web.get("/dup.jpg", fixed(jpeg(120, 100, seed=0))),
    ]


def test_crawled_url_list_turns_every_failure_into_a_reason(ray_local, settings, tmp_path):
    settings = settings.model_copy(
        update={"crawl": CrawlSettings(timeout_s=1.0, retries=2, backoff_s=0.01, max_bytes=200_000)}
    )
    with (
        ServedSite(lambda s: crawl_routes(s, s)) as other,
        ServedSite(lambda s: crawl_routes(s, other)) as site,
    ):
        paths = [f"/img/{n}.jpg" for n in range(4)] + [
            "/flaky.jpg",
            "/elsewhere",
            "/dup.jpg",
            "/slow.jpg",
            "/missing.jpg",
            "/error.jpg",
            "/loop/a",
            "/huge.jpg",
            "/page.html",
            "/truncated.jpg",
            "/noai.jpg",
        ]
        rows = [{"url": site.url(p), "caption": f"c{i}"} for i, p in enumerate(paths)]
        rows.append({"url": "ftp://127.0.0.1/x.jpg", "caption": "bad scheme"})
        listing = tmp_path / "urls.jsonl"
        listing.write_text("\n".join(json.dumps(r) for r in rows))
        report = run(settings, listing, shard_size=5)
        assert site.hits["/error.jpg"] == 3, "a 5xx is retried twice"
        assert site.hits["/flaky.jpg"] == 2 and site.hits["/noai.jpg"] == 1
        assert other.hits["/img/999.jpg"] == 1

    (stage,) = report["stages"]
    assert stage["errors_by_reason"] == {
        "bad_url": 1,
        "decode_error": 1,
        "http_status": 2,
        "not_an_image": 1,
        "redirect_loop": 1,
        "robots_opt_out": 1,
        "timeout": 1,
        "too_large": 1,
    }
    assert stage["rows_out"] == 7 and stage["metrics"]["exact_duplicates"] == 1
    captions = dict(query(settings, """SELECT metadata->>'caption', uri FROM "j".ingest"""))
    assert captions["c4"].endswith("/flaky.jpg") and captions["c5"].endswith("/elsewhere")
    details = dict(query(settings, 'SELECT reason, detail FROM "j".ingest_errors'))
    assert "404" in details["http_status"] or "500" in details["http_status"]


def test_demo_job_reports_every_planted_problem(ray_local, settings, tmp_path):
    from curate.demo import FileKind, generate_demo

    manifest = generate_demo(tmp_path / "demo", count=120, seed=1)
    report = run(settings, tmp_path / "demo" / "crawl", job="demo", shard_size=40)
    (stage,) = report["stages"]
    crawl = tmp_path / "demo"
    errors = query(settings, 'SELECT uri, reason FROM "demo".ingest_errors')
    got = {
        str((crawl / path).resolve()): reason for path, reason in manifest.expected_errors().items()
    }
    assert dict(errors) == got, "every broken file, and nothing else, is an error row"
    exact = manifest.by_kind(FileKind.EXACT_DUPLICATE)
    assert stage["metrics"]["exact_duplicates"] == len(exact)
    duplicates = dict(query(settings, 'SELECT uri, duplicate_of FROM "demo".ingest_duplicates'))
    for planted in exact:
        # Which copy comes first in path order decides which is "the duplicate".
        pair = {
            str((crawl / planted.path).resolve()),
            str((crawl / planted.duplicate_of).resolve()),
        }
        assert any({uri, first} == pair for uri, first in duplicates.items())
    assert stage["rows_out"] == len(manifest.crawl_files) - len(got)
    by_sha = dict(query(settings, 'SELECT image_id, uri FROM "demo".ingest'))
    for sample in manifest.by_kind(FileKind.MODE_SAMPLE):
        assert sample.sha256 in by_sha, f"{sample.variant} sample was not ingested"


def test_a_failing_part_fails_the_job_clearly_and_a_rerun_resumes(ray_local, settings, tmp_path):
    from pipelines.failures import StageFailed

    write_folder(tmp_path / "imgs", 4)
    spec = parse_job_spec({"source": str(tmp_path / "imgs"), "job_id": "f", "until": "ingest"})
    # A file where the stage's folder should be: every worker's write fails (disk trouble).
    blocker = settings.job_dir("f") / "ingest"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    with pytest.raises(StageFailed, match="ingest failed on part 0"):
        run_job(spec, settings, log=lambda _: None)
    report = Catalog(settings.catalog_file, settings.data_root).job_report("f")
    assert report["status"] == "failed" and "part 0" in report["message"]
    assert report["stages"][0]["status"] == "failed"

    blocker.unlink()
    report = run_job(spec, settings, log=lambda _: None)
    assert report["status"] == "done" and report["stages"][0]["rows_out"] == 4


def test_a_corrupt_parquet_shard_is_an_error_row_not_a_failed_job(ray_local, settings, tmp_path):
    images = [jpeg(100, 100, seed=90 + i) for i in range(6)]
    good = write_hf_parquet(tmp_path / "src" / "a.parquet", images[:3], row_group_size=3)
    bad = write_hf_parquet(tmp_path / "src" / "b.parquet", images[3:], row_group_size=3)
    data = bytearray(bad.read_bytes())
    data[100:2000] = b"\x00" * 1900  # clobber the data pages; the footer still reads
    bad.write_bytes(bytes(data))
    report = run(settings, tmp_path / "src" / "*.parquet", job="pq")
    (stage,) = report["stages"]
    assert stage["rows_out"] == 3 and stage["errors_by_reason"] == {"read_error": 1}
    ((uri, detail),) = query(settings, 'SELECT uri, detail FROM "pq".ingest_errors')
    assert uri.startswith(str(bad)) and "row groups" in detail and good.exists()
