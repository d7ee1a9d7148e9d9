"""The web UI in real headless Chromium against the real service (uvicorn on 127.0.0.1, a real
catalog, jobs run by real driver processes): sign in, submit a job from the form and watch it
finish over the event stream, then browse the demo job: clusters, a cluster's members page by
page, a seed's neighbours and back, dedup groups and the map. Every page is screenshotted into
the test's tmp folder; CURATE_UI_SCREENSHOT=PATH also writes the cluster browser there (the
README's docs/cluster-browser.png)."""

import io
import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCREENSHOT_LIMIT = 300_000  # bytes: the README's image stays small


def sign_in(browser, token: str, start: str | None = "#/jobs") -> None:
    """Open `start` (signed out, that leads to sign-in) and sign in; None: sign in right here."""
    if start is not None:
        browser.open(start)
    browser.page.wait_for_selector("#token")
    browser.page.fill("#token", token)
    browser.page.click("form button[type=submit]")
    browser.page.wait_for_selector("#token", state="detached")


def test_sign_in_submit_a_job_and_watch_it_finish(
    browser, api_server, client, write_token, demo_corpus, request
):
    page = browser.page
    # Signed out, any page leads to sign-in; a wrong token is refused there.
    browser.open("#/jobs")
    page.wait_for_selector("#token")
    page.fill("#token", "not-a-token")
    page.click("form button[type=submit]")
    page.wait_for_selector("[role=alert]")
    assert "not valid" in page.inner_text("[role=alert]")
    browser.shot("login")
    sign_in(browser, write_token)
    page.wait_for_selector("#submit-job")
    assert page.url.endswith("#/jobs")

    # A source outside the service's roots: refused, and the form says so at the field.
    page.fill("#job-source", "/etc")
    page.click("#submit-job button[type=submit]")
    page.wait_for_selector("#job-source-error:not(:empty)")
    assert page.get_attribute("#job-source", "aria-invalid") == "true"
    browser.shot("jobs-form-error", full_page=True)

    # A small folder of the demo corpus, ingest only (the demo job below runs every stage):
    # submitted from the form, its progress followed live from the event stream.
    source = api_server.sources / "ui-small"
    source.mkdir(exist_ok=True)
    crawl = demo_corpus / "crawl"
    for file in sorted(path for path in crawl.rglob("*") if path.is_file())[:24]:
        (source / file.relative_to(crawl)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, source / file.relative_to(crawl))
    page.fill("#job-source", str(source))
    page.fill("#job-job_id", "ui-form")
    page.select_option("#job-recipe", "demo")
    page.select_option("#job-until", "ingest")
    page.click("#submit-job button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/ui-form$"))
    page.wait_for_selector(".job h1 .status")
    # While the page follows this job, the session's demo job (the next test's) runs too: the
    # two drivers overlap their start-up instead of queueing. The page keeps its event stream.
    request.getfixturevalue("demo_job")
    page.wait_for_selector(".job h1 [data-status=done]", timeout=120_000)
    assert page.get_attribute("tr[data-stage=ingest]", "data-status") == "done"
    assert page.inner_text("tr[data-stage=ingest] td.progress").strip() == "1 / 1"
    counts = client.get("/v1/jobs/ui-form").json()["counts"]
    assert counts["items_read"] == 24
    shown = page.eval_on_selector_all(".counts dd", "els => els.map(e => e.textContent)")
    assert shown[0] == "24" and shown[4] == str(counts["errors"])
    # Errors by reason, as the API counts them, with example rows on demand.
    if counts["errors"]:
        page.locator("details.reason summary").first.click()
        page.wait_for_selector("details.reason .examples li")
    browser.shot("job-done", full_page=True)

    # Back on the list, the new job is there with its counts.
    page.click("#crumbs a[href='#/jobs']")
    row = page.locator("tr[data-job=ui-form]")
    row.wait_for()
    assert "done" in row.inner_text()
    browser.shot("jobs", full_page=True)


def test_browse_the_demo_job(browser, client, write_token, demo_job):
    page = browser.page
    job = demo_job["job_id"]
    sign_in(browser, write_token, f"#/jobs/{job}")
    page.wait_for_selector(".job h1 [data-status=done]")
    browser.shot("job", full_page=True)

    # The cluster browser: cards with thumbnails that really decode, sortable.
    page.click(".results a:text('Clusters')")
    page.wait_for_selector(".cards li.cluster")
    browser.thumbnails_loaded(".cards li.cluster:nth-child(-n+6) img")
    sizes = [int(v) for v in browser.data(".cards li", "size")]
    api_clusters = client.get(f"/v1/jobs/{job}/clusters", params={"limit": 500}).json()["items"]
    assert len(sizes) == len(api_clusters) and sizes == sorted(sizes, reverse=True)
    browser.shot("clusters")
    readme_screenshot(browser)
    page.click(".sort a:text('Seed coverage')")
    # The URL changes before the page does: wait for the new page's own marks, not the old cards.
    page.wait_for_selector(".sort a[aria-current=true]:text('Seed coverage')")
    page.wait_for_selector(".cards li.cluster")
    covered = [int(v) for v in browser.data(".cards li", "coverage")]
    assert covered == sorted(covered, reverse=True) and covered[0] > 0
    browser.shot("clusters-by-coverage")

    # The best-covered cluster, its members fetched one per page as the page scrolls: the
    # grid ends with exactly the API's members, nearest the centroid first.
    first = page.get_attribute(".cards li.cluster:first-child", "data-cluster")
    page.route(
        "**/members?*",
        lambda route: route.continue_(url=route.request.url.replace("limit=120", "limit=1")),
    )
    page.click(".cards li.cluster:first-child h2 a")
    members = client.get(f"/v1/jobs/{job}/clusters/{first}/members", params={"limit": 500})
    expected = [member["image_id"] for member in members.json()["items"]]
    assert len(expected) >= 2
    page.wait_for_selector(f"h1:text-is('Cluster {first}')")
    page.wait_for_selector(".pager-note:has-text('All')")
    shown = browser.data(".grid > li", "image")
    assert shown == expected
    distances = [float(v) for v in browser.data(".grid > li", "distance")]
    assert distances == sorted(distances)
    browser.thumbnails_loaded(".grid > li img")
    page.unroute("**/members?*")
    browser.shot("cluster", full_page=True)

    # A seed's provenance: from the cluster to a seed, its neighbours, and back from a neighbour.
    seed_link = page.locator(".tile.is-seed a.pic, .why a[href*='/seeds/']").first
    seed_link.click()
    page.wait_for_url(re.compile(r"/seeds/"))
    page.wait_for_selector(".provenance h1")
    seed_id = page.url.rsplit("/", 1)[1]
    neighbours = page.locator(".grid > li")
    assert neighbours.count() >= 1
    browser.thumbnails_loaded(".grid > li img")
    browser.shot("seed", full_page=True)
    neighbours.first.locator("a.pic").click()
    page.wait_for_selector("table.picks")
    assert page.locator(f"table.picks a[href$='/{seed_id}']").count() >= 1
    browser.shot("image", full_page=True)

    # Dedup: every group shows its kept representative first, then what it removed and why.
    browser.open(f"#/jobs/{job}/dedup")
    page.wait_for_selector(".groups > li")
    for group in page.locator(".groups > li").all()[:5]:
        tiles = group.locator(".grid > li")
        assert "kept" in tiles.first.get_attribute("class")
        assert tiles.count() >= 2 and tiles.nth(1).get_attribute("data-reason")
    browser.thumbnails_loaded(".groups > li:nth-child(-n+3) img")
    browser.shot("dedup")

    # The map: one circle per cluster; clicking one opens that cluster.
    browser.open(f"#/jobs/{job}/map")
    page.wait_for_selector("svg.map circle")
    points = client.get(f"/v1/jobs/{job}/map").json()["clusters"]
    assert page.locator("svg.map circle").count() == len(points)
    browser.shot("map")
    target = page.locator("svg.map a").last
    cluster_id = target.get_attribute("data-cluster")
    target.click()
    page.wait_for_url(re.compile(rf"#/jobs/{job}/clusters/{cluster_id}$"))
    page.wait_for_selector(".grid > li")


def test_a_signed_out_deep_link_comes_back_after_sign_in(browser, write_token, demo_job):
    page = browser.page
    job = demo_job["job_id"]
    browser.open(f"#/jobs/{job}/map")
    page.wait_for_selector("#token")
    sign_in(browser, write_token, start=None)
    page.wait_for_url(re.compile(rf"#/jobs/{job}/map$"))
    page.wait_for_selector("svg.map circle")
    # The map's circles are links a keyboard reaches and opens.
    first = page.locator("svg.map a").first
    cluster_id = first.get_attribute("data-cluster")
    first.focus()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"#/jobs/{job}/clusters/{cluster_id}$"))
    page.wait_for_selector(".grid > li")
    # Signing out ends the cookie: the next page asks again.
    page.click("#signout")
    page.wait_for_selector("#token")
    browser.open(f"#/jobs/{job}/clusters")
    page.wait_for_url(re.compile(r"#/login$"))
    page.wait_for_selector("#token")


def readme_screenshot(browser) -> None:
    """The cluster browser for the README, when CURATE_UI_SCREENSHOT names where it goes."""
    target = os.environ.get("CURATE_UI_SCREENSHOT")
    if not target:
        return
    from PIL import Image

    # Every thumbnail in view decoded first: a README image with grey squares shows nothing.
    browser.page.wait_for_function(
        """() => [...document.querySelectorAll('.cards img')]
            .filter((img) => img.getBoundingClientRect().top < innerHeight)
            .every((img) => img.complete && img.naturalWidth > 0)"""
    )
    png = browser.page.screenshot()
    if len(png) > SCREENSHOT_LIMIT:
        # A 256-colour palette keeps thumbnails recognisable at a fraction of the size.
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
        png = buffer.getvalue()
    assert len(png) <= SCREENSHOT_LIMIT, len(png)
    Path(target).write_bytes(png)
