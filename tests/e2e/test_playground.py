"""The playground in a real headless Chromium, against the real server (tiny SD) with API_KEY set: the page asks
for the key, runs a txt2img with live progress, an inpaint with a mask drawn by the mouse, cancels a long job;
/docs and /redoc load without leaving the server.

Chromium is the system's (Debian's `chromium`, which .ci/run installs; CHROMIUM names another executable),
driven by playwright; without it these tests skip. Screenshots of each state go to ARTIFACTS_DIR (default
tests/artifacts, git-ignored) under playground/.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusers_api.schema import GenerateRequest
from support.processes import Process, serving

pytestmark = pytest.mark.e2e

API_KEY = "playground-secret"
AUTH = {"authorization": f"Bearer {API_KEY}"}
WAIT_MS = 60_000
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parents[1] / "artifacts")) / "playground"
# Records every value the progress bar shows, from the page's first script on, for the test to read back.
RECORD_PROGRESS = """
window.__progress = [];
new MutationObserver(() => {
  const bar = document.getElementById("progress");
  if (bar) window.__progress.push(Number(bar.getAttribute("aria-valuenow")));
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow"]});
"""


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (.ci/run does), or set CHROMIUM to its executable")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: make install")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI and these machines run as root, where Chromium's sandbox refuses to start
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(browser: Any, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with serving(models_dir, tmp_path_factory.mktemp("playground") / "server.log", {"API_KEY": API_KEY}) as process:
        yield process


@pytest.fixture
def fresh_page(browser: Any) -> Iterator[Any]:
    """A page in a new browser context: nothing stored, no key."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.add_init_script(RECORD_PROGRESS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the page's script failed: {errors}"


@pytest.fixture
def page(fresh_page: Any, server: Process) -> Any:
    """The playground, loaded, with the API key entered."""
    fresh_page.goto(f"{server.url}/")
    enter_key(fresh_page)
    return fresh_page


def enter_key(page: Any) -> None:
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function("document.querySelectorAll('#scheduler option').length > 1")


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True, animations="disabled")


def generate(page: Any, **fields: str) -> str:
    """Fill the form's `fields` (by element id), press Generate; returns the job's id once it was submitted."""
    for element_id, value in fields.items():
        page.fill(f"#{element_id}", value)
    with page.expect_response(lambda response: response.url.endswith("/v1/jobs")) as submitted:
        page.click("#generate")
    assert submitted.value.status == 202, submitted.value.text()
    return str(submitted.value.json()["id"])


def job(server: Process, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def shown_image(page: Any) -> Image.Image:
    page.wait_for_function("[...document.querySelectorAll('#results figure img')].some((img) => img.naturalWidth)")
    source = page.get_attribute("#results figure img", "src")
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))


def test_the_page_asks_for_the_key_then_lists_models_and_schedulers(fresh_page: Any, server: Process) -> None:
    page = fresh_page
    page.goto(f"{server.url}/")
    page.wait_for_selector("#notice:not([hidden])")
    assert "API key" in page.inner_text("#notice")
    assert page.locator("#scheduler option").count() == 1  # nothing listed without the key
    screenshot(page, "1-asks-for-the-key")

    enter_key(page)
    assert page.is_hidden("#notice")
    assert page.get_attribute("#server-state", "data-state") == "READY"
    assert page.inner_text("#server-model") == "builtin/tiny-sd"
    options = page.locator("#scheduler option").all_inner_texts()
    assert options[0] == "Default (DPMSolverMultistepScheduler)"
    assert {"Euler a", "DPM++ 2M Karras"} <= set(options)
    screenshot(page, "2-loaded")

    page.reload()  # the key stays in this browser: the lists load again without typing it
    page.wait_for_function("document.querySelectorAll('#scheduler option').length > 1")
    assert page.input_value("#api-key") == API_KEY


def test_txt2img_shows_live_progress_then_the_image_and_its_seed(page: Any, server: Process) -> None:
    job_id = generate(page, prompt="a red barn", steps="24", seed="5")
    page.wait_for_selector("#job-status[data-status=done]")
    image = shown_image(page)

    progress = page.evaluate("window.__progress")
    assert progress[-1] == 100
    assert any(0 < value < 100 for value in progress), progress  # it moved while the job ran, not only at the end
    assert progress == sorted(progress), progress
    assert image.size == (64, 64)
    assert page.inner_text("#results figcaption .seed") == "seed 5 · 64×64"
    assert "inference" in page.inner_text("#result-info")
    assert page.locator("#history button").count() == 1
    assert page.get_attribute("#results", "data-job") == job_id
    screenshot(page, "3-txt2img-done")

    done = job(server, job_id)
    assert done["status"] == "COMPLETED"
    assert done["result"]["images"][0]["seed"] == 5


def test_a_job_that_ends_before_its_stream_opens_still_shows_its_image(page: Any, server: Process) -> None:
    """The stream of a finished job starts with a status snapshot that carries no images; the page waits for the
    final status (which does) instead of failing on the snapshot."""
    held: list[Any] = []

    def hold(route: Any) -> None:  # the events stream opens only once the job has finished
        held.append(route)
        deadline = time.monotonic() + 30
        while job(server, route.request.url.split("/v1/jobs/")[1].split("/")[0])["status"] != "COMPLETED":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.1)
        route.continue_()

    page.route("**/v1/jobs/*/events*", hold)
    generate(page, prompt="a quick barn", steps="2", seed="7")
    page.wait_for_selector("#job-status[data-status=done]")
    assert held, "the events stream was not held"
    assert shown_image(page).size == (64, 64)
    assert page.inner_text("#results figcaption .seed") == "seed 7 · 64×64"


def test_a_refused_request_shows_the_servers_error(page: Any) -> None:
    page.fill("#width", "60")  # not a multiple of 8: the server, not the browser, says what is wrong
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error code") == "INVALID_INPUTS"
    assert "width" in page.inner_text("#error")
    assert page.is_enabled("#generate")
    assert page.is_disabled("#cancel")


def test_inpaint_with_a_mask_drawn_on_the_image(page: Any, server: Process) -> None:
    page.set_input_files("#init-file", files=[png_file("blue.png", Image.new("RGB", (96, 64), (40, 120, 200)))])
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.inner_text("#mode") == "img2img"
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    assert page.inner_text("#mode") == "inpaint"
    assert page.get_attribute("#width", "placeholder") == "96"  # the request takes the image's size
    screenshot(page, "4-mask-drawn")

    with page.expect_request(lambda request: request.url.endswith("/v1/jobs")) as sent:
        generate(page, prompt="a yellow boat", steps="8", seed="9")
    page.wait_for_selector("#job-status[data-status=done]")
    assert shown_image(page).size == (96, 64)
    assert "StableDiffusionInpaintPipeline" in page.inner_text("#result-info")
    screenshot(page, "5-inpaint-done")

    body = json.loads(sent.value.post_data)
    mask = np.asarray(decode_data_uri(body["mask_image"]).convert("L"))
    assert mask.shape == (64, 96)
    assert set(np.unique(mask)) == {0, 255}  # white is repainted, black kept
    assert mask[32, 48] == 255  # on the stroke
    assert mask[5, 5] == mask[60, 90] == 0  # far from it
    assert decode_data_uri(body["image"]).size == (96, 64)


def test_inpaint_with_an_uploaded_mask(page: Any, server: Process) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is repainted
    page.set_input_files("#init-file", files=[png_file("init.png", Image.new("RGB", (64, 64), (200, 60, 40)))])
    page.wait_for_selector("#mask-file:enabled")
    page.set_input_files("#mask-file", files=[png_file("mask.png", mask)])
    page.wait_for_function("document.getElementById('mode').textContent === 'inpaint'")

    with page.expect_request(lambda request: request.url.endswith("/v1/jobs")) as sent:
        generate(page, prompt="a red wall", steps="2", seed="1")
    page.wait_for_selector("#job-status[data-status=done]")
    assert "StableDiffusionInpaintPipeline" in page.inner_text("#result-info")
    screenshot(page, "6-uploaded-mask-done")

    sent_mask = np.asarray(decode_data_uri(json.loads(sent.value.post_data)["mask_image"]).convert("L"))
    assert (sent_mask[:, :32] == 255).all()
    assert (sent_mask[:, 32:] == 0).all()


def png_file(name: str, image: Image.Image) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"name": name, "mimeType": "image/png", "buffer": buffer.getvalue()}


def decode_data_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_cancel_a_long_job(page: Any, server: Process) -> None:
    job_id = generate(page, prompt="a long one", steps="1000")
    page.wait_for_function("Number(document.getElementById('progress').getAttribute('aria-valuenow')) >= 2")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_selector("#job-status[data-status=cancelled]")
    assert page.inner_text("#job-status") == "Cancelled"
    assert page.is_enabled("#generate")
    screenshot(page, "7-cancelled")

    cancelled = job(server, job_id)
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["error"]["step"] < 1000


def test_docs_and_redoc_load_nothing_from_elsewhere(fresh_page: Any, server: Process) -> None:
    page = fresh_page
    loaded: list[str] = []
    failed: list[tuple[str, str]] = []
    page.on("requestfinished", lambda request: loaded.append(request.url))
    page.on("requestfailed", lambda request: failed.append((request.url, request.failure)))

    page.goto(f"{server.url}/docs")
    operation = page.locator("#operations-jobs-create_job_v1_jobs_post")
    operation.locator(".opblock-summary").click()
    example = json.loads(operation.locator(".body-param__example").inner_text())
    # the example /docs offers to send is the request's first, which names no model and runs as it is
    assert example == GenerateRequest.model_json_schema()["examples"][0]
    screenshot(page, "8-docs")

    page.goto(f"{server.url}/redoc")
    page.locator("h2", has_text="Queue a request as a job").wait_for()
    screenshot(page, "9-redoc")

    assert [url for url in loaded if not url.startswith((server.url, "blob:", "data:"))] == []
    # only Redocly's logo, which the page's Content-Security-Policy stops before any request leaves
    assert all(reason == "csp" for _, reason in failed), failed
