"""The portal in a real browser: Debian's Chromium driven by Playwright.

Signs in, searches, opens a study and its viewer, then checks what a reader relies on: slices
scroll with keys and wheel, a window drag maps every stored value exactly as the window
predicts, a distance is measured in millimetres from PixelSpacing, MONOCHROME1 shows inverted
and RGB as is. A screenshot of the viewer is saved under var/test-artifacts/ on every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.conf import settings
from pydicom.uid import generate_uid

from archive.ingest import Source, ingest_bytes, ingest_file
from archive.models import Instance
from tests.conftest import make_dataset, make_user, part10

# Playwright's sync API runs an event loop in this thread; the ORM calls the tests make
# between browser steps are still plain synchronous calls.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(settings.BASE_DIR) / "var" / "test-artifacts"
PASSWORD = "correct horse battery staple"
ROWS = COLUMNS = 64


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server, transactional_db, settings) -> Iterator:
    # The live server serves /static/ from the apps' folders (not collectstatic's hashed
    # copies that gunicorn and WhiteNoise serve in production): plain names here.
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    make_user("alice", "Radiologist", password=PASSWORD, first_name="Alice")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=live_server.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    yield page
    context.close()
    assert errors == [], f"JavaScript errors: {errors}"


def ct_series(slices: int = 5, **extra) -> tuple[str, str, np.ndarray]:
    """A CT series of 64x64 slices whose stored values are a known ramp (0..4095)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    values = (np.arange(ROWS * COLUMNS, dtype=np.uint16)).reshape(ROWS, COLUMNS)
    for index in range(slices):
        ds = make_dataset(
            study_uid=study_uid, series_uid=series_uid, rows=ROWS, columns=COLUMNS, instance_number=index + 1,
            patient_name="Browser^Bea", patient_id="P-BROWSER", accession="ACC-BROWSER",
        )
        ds.ImagePositionPatient = [-16.0, -16.0, float(-index)]
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.SliceThickness = "1.0"
        ds.PixelData = values.tobytes()
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        assert ingest_bytes(part10(ds), Source(channel="test")).ok
    return study_uid, series_uid, values


def open_viewer(page, study_uid: str) -> None:
    page.goto(f"/viewer/{study_uid}/")
    page.wait_for_function("window.pacsViewer && window.pacsViewer.losslessPaint !== null", timeout=15000)


def position(page) -> str:
    return page.inner_text("#position")


def expected_window(values: np.ndarray, center: float, width: float, slope=1.0, intercept=-1024.0) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 in NumPy (as archive/render.py computes it)."""
    from archive.render import window_linear

    return window_linear(values.astype(np.float64) * slope + intercept, center, width)


def canvas_values(page) -> np.ndarray:
    red = page.evaluate(
        """() => { const c = window.pacsViewer.imageCanvas;
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   const out = []; for (let i = 0; i < d.length; i += 4) out.push(d[i]); return out; }"""
    )
    return np.array(red, dtype=np.uint8).reshape(ROWS, COLUMNS)


def test_it_signs_in_searches_and_opens_a_study_in_the_viewer(page) -> None:
    study_uid, _, _ = ct_series()
    page.fill("input[name=name]", "browser")
    page.click("#study-search button[type=submit] >> text=Search")
    page.wait_for_selector(f"tr[data-study='{study_uid}']")
    assert page.locator("tbody tr").count() == 1
    page.click(f"tr[data-study='{study_uid}'] a")
    page.wait_for_selector("#open-viewer")
    assert "BROWSER, Bea" in page.inner_text("h1")
    page.wait_for_function("document.querySelector('.series-card img').naturalWidth > 0")  # the thumbnail shows
    page.click("#open-viewer")
    page.wait_for_function("window.pacsViewer && window.pacsViewer.firstPaint !== null")
    assert position(page) == "Image 1 / 5"
    page.wait_for_function("window.pacsViewer.state.loaded === 5")
    assert "All 5 loaded" in page.inner_text("#progress")
    overlay = page.inner_text("#viewport")
    for text in ("BROWSER, Bea", "P-BROWSER", "WL 40", "WW 400", "Spacing 0.5 × 0.5 mm", "Thk 1 mm"):
        assert text in overlay
    assert [page.inner_text(f"#orient-{side}") for side in ("top", "bottom", "left", "right")] == ["A", "P", "R", "L"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))


def test_it_scrolls_with_keys_wheel_and_slider(page) -> None:
    study_uid, _, _ = ct_series(slices=12)
    open_viewer(page, study_uid)
    page.focus("#viewport")
    page.keyboard.press("ArrowDown")
    assert position(page) == "Image 2 / 12"
    page.keyboard.press("PageDown")
    assert position(page) == "Image 12 / 12"
    page.keyboard.press("Home")
    assert position(page) == "Image 1 / 12"
    page.mouse.move(700, 400)
    page.mouse.wheel(0, 100)
    page.wait_for_function("document.getElementById('position').textContent !== 'Image 1 / 12'")
    assert position(page) in ("Image 2 / 12", "Image 3 / 12")
    page.keyboard.press("End")
    assert position(page) == "Image 12 / 12"
    page.keyboard.press("ArrowUp")
    assert position(page) == "Image 11 / 12"
    page.fill("#slider", "4")
    page.dispatch_event("#slider", "input")
    assert position(page) == "Image 4 / 12"


def test_a_window_drag_changes_the_pixels_as_the_window_predicts(page) -> None:
    study_uid, _, values = ct_series(slices=1)
    open_viewer(page, study_uid)
    assert np.array_equal(canvas_values(page), expected_window(values, 40, 400))
    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 60, steps=6)
    page.mouse.up()
    center, width = page.evaluate("[window.pacsViewer.state.center, window.pacsViewer.state.width]")
    assert width > 400 and center > 40  # right widens, down raises the level
    assert f"WL {center:.1f}".rstrip("0").rstrip(".") in page.inner_text("#overlay-br")
    assert np.array_equal(canvas_values(page), expected_window(values, center, width))
    # a preset, invert, and reset
    page.keyboard.press("2")  # the second entry: CT soft tissue follows the dataset's own window
    assert page.evaluate("[window.pacsViewer.state.center, window.pacsViewer.state.width]") == [40, 400]
    page.keyboard.press("i")
    assert np.array_equal(canvas_values(page), 255 - expected_window(values, 40, 400))
    page.keyboard.press("r")
    assert np.array_equal(canvas_values(page), expected_window(values, 40, 400))


def test_it_measures_a_distance_in_millimetres(page) -> None:
    study_uid, _, _ = ct_series(slices=1)
    open_viewer(page, study_uid)
    page.click("[data-tool=measure]")
    box = page.locator("#viewport").bounding_box()
    start = page.evaluate("window.pacsViewer.imageToScreen([10, 20])")
    end = page.evaluate("window.pacsViewer.imageToScreen([50, 50])")
    page.mouse.move(box["x"] + start[0], box["y"] + start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=5)
    page.mouse.up()
    labels = page.evaluate("window.pacsViewer.measurementLabels()")
    # 40 columns and 30 rows of 0.5 mm: 25 mm (within a screen pixel's worth)
    assert len(labels) == 1 and labels[0].endswith(" mm")
    assert abs(float(labels[0].split()[0]) - 25.0) < 0.5


def test_monochrome1_shows_inverted(page) -> None:
    study_uid, _, values = ct_series(slices=1, PhotometricInterpretation="MONOCHROME1")
    open_viewer(page, study_uid)
    assert np.array_equal(canvas_values(page), 255 - expected_window(values, 40, 400))
    assert page.evaluate("window.pacsViewer.pixel(0, 0)") == 255  # the lowest value is white


def test_an_rgb_image_shows_its_own_colours(page) -> None:
    path = Path(pydicom.data.__file__).parent / "test_files" / "SC_rgb_small_odd.dcm"
    result = ingest_file(path, Source(channel="test"))
    assert result.ok, result.reason
    instance = Instance.objects.select_related("series__study").get(pk=result.instance_id)
    open_viewer(page, instance.series.study.study_instance_uid)
    pixels = pydicom.dcmread(path).pixel_array
    for row, column in ((0, 0), (1, 2), (pixels.shape[0] - 1, pixels.shape[1] - 1)):
        assert page.evaluate(f"window.pacsViewer.rgba({column}, {row})")[:3] == pixels[row, column].tolist()
