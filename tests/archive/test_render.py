"""The render service: decoding, windowing, the packed rendition's round trip, the cache."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.db import connection
from PIL import Image
from pydicom.pixels import apply_color_lut, pixel_array

from archive import render
from archive.dicom import json_header
from archive.ingest import Source, ingest_bytes
from archive.models import Instance
from tests.conftest import make_dataset, part10, run_together

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def local(name: str) -> pydicom.Dataset:
    """A pydicom test file that ships with the package (never downloaded)."""
    return pydicom.dcmread(TEST_FILES / name)


def png_array(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


def unpack(data: bytes, signed: bool) -> np.ndarray:
    """What the viewer does with a packed PNG: red is the high byte, green the low byte."""
    rgb = png_array(data).astype(np.uint16)
    words = (rgb[..., 0] << 8) | rgb[..., 1]
    return words.view(np.int16) if signed else words


def grey_dataset(values: np.ndarray, *, bits_stored: int, signed: bool, photometric: str = "MONOCHROME2", **extra):
    ds = make_dataset(rows=values.shape[0], columns=values.shape[1])
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16 if bits_stored <= 16 else 32
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {8: np.int8 if signed else np.uint8, 16: np.int16 if signed else np.uint16, 32: np.int32 if signed else np.uint32}
    ds.PixelData = values.astype(dtype[ds.BitsAllocated]).tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------- the packed rendition


@pytest.mark.parametrize(
    ("bits", "signed", "low", "high"),
    [
        (16, True, -32768, 32767),  # every signed value, negative ones included
        (12, False, 0, 4095),
        (12, True, -2048, 2047),
        (16, False, 0, 65535),
        (8, False, 0, 255),
    ],
)
def test_it_round_trips_every_stored_value_through_the_packed_png(bits: int, signed: bool, low: int, high: int) -> None:
    values = np.linspace(low, high, 64 * 64).round().astype(np.int64).reshape(64, 64)
    values[0, :4] = [low, high, 0 if low <= 0 else low, -1 if signed else high]
    ds = grey_dataset(values, bits_stored=bits, signed=signed)
    decoded = unpack(render.render(ds, 1, "packed"), signed)
    assert np.array_equal(decoded.astype(np.int64), values)


def test_it_keeps_the_top_16_bits_of_32_bit_data_and_says_how_to_undo_it() -> None:
    values = np.array([[-(2**31), -5, 0, 7], [2**20, 2**31 - 1, 123456, -123456]], dtype=np.int64)
    ds = grey_dataset(values, bits_stored=32, signed=True, RescaleSlope="2", RescaleIntercept="-10")
    info = render.image_info(json_header(ds))
    words = unpack(render.render(ds, 1, "packed"), signed=info["signed"]).astype(np.float64)
    restored = words * info["slope"] + info["intercept"]
    expected = values * 2.0 - 10
    assert np.all(np.abs(restored - expected) <= info["slope"])  # within one packed step


def test_it_gives_the_packed_transform_in_the_image_info() -> None:
    ds = grey_dataset(np.zeros((4, 4)), bits_stored=12, signed=True, RescaleSlope="1.5", RescaleIntercept="-1024")
    ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = ["40", "-600"], ["400", "1500"], ["SOFT", "LUNG"]
    ds.PixelSpacing = ["0.7", "0.8"]
    info = render.image_info(json_header(ds))
    assert (info["signed"], info["slope"], info["intercept"]) == (True, 1.5, -1024.0)
    assert info["windows"] == [
        {"center": 40.0, "width": 400.0, "name": "SOFT"},
        {"center": -600.0, "width": 1500.0, "name": "LUNG"},
    ]
    assert (info["pixel_spacing"], info["spacing_source"]) == ([0.7, 0.8], "PixelSpacing")
    assert info["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert (info["rows"], info["columns"], info["frames"], info["invert"], info["colour"]) == (4, 4, 1, False, False)


def test_it_says_when_only_the_imager_pixel_spacing_is_known() -> None:
    ds = grey_dataset(np.zeros((4, 4)), bits_stored=12, signed=False)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = ["0.15", "0.15"]
    info = render.image_info(json_header(ds))
    assert (info["pixel_spacing"], info["spacing_source"]) == ([0.15, 0.15], "ImagerPixelSpacing")


# --------------------------------------------------------------------- the 8-bit preview


@pytest.mark.parametrize(
    ("value", "expected"),
    [(-200, 0), (-160, 0), (-159, 1), (40, 128), (238, 254), (239, 255), (239.5, 255), (1000, 255)],
)
def test_it_windows_as_ps3_3_c_11_2_1_2_1_says(value: float, expected: int) -> None:
    assert render.window_linear(np.array([value], dtype=np.float64), 40, 400)[0] == expected


def test_it_applies_rescale_then_the_dataset_window() -> None:
    stored = np.array([[0, 865, 1064, 1264, 4095]], dtype=np.int64)  # -1024, -159, 40, 240, 3071 HU
    ds = grey_dataset(stored, bits_stored=12, signed=False, RescaleSlope="1", RescaleIntercept="-1024")
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    assert png_array(render.render(ds, 1, "preview")).tolist() == [[0, 1, 128, 255, 255]]


def test_it_windows_over_the_pixel_range_when_the_dataset_has_no_window() -> None:
    stored = np.array([[100, 200, 300]], dtype=np.int64)
    ds = grey_dataset(stored, bits_stored=12, signed=False)
    image = png_array(render.render(ds, 1, "preview"))
    assert image[0, 0] == 0 and image[0, 2] == 255 and 120 <= image[0, 1] <= 135


def test_it_shows_monochrome1_inverted() -> None:
    stored = np.array([[0, 4095]], dtype=np.int64)
    ds = grey_dataset(stored, bits_stored=12, signed=False, photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    assert png_array(render.render(ds, 1, "preview")).tolist() == [[255, 0]]
    info = render.image_info(json_header(ds))
    assert info["invert"] is True


def test_it_renders_signed_ct_through_its_rescale() -> None:
    ds = local("CT_small.dcm")  # signed 16-bit, RescaleIntercept -1024
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    image = png_array(render.render(ds, 1, "preview"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert np.array_equal(image, render.window_linear(hu, center, width))


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"]
)
def test_it_decodes_compressed_and_big_endian_data_to_the_same_values(name: str) -> None:
    reference = unpack(render.render(local("MR_small.dcm"), 1, "packed"), signed=True)
    assert np.array_equal(unpack(render.render(local(name), 1, "packed"), signed=True), reference)


def test_it_renders_rgb_as_is() -> None:
    ds = local("SC_rgb_small_odd.dcm")
    assert np.array_equal(png_array(render.render(ds, 1, "preview")), ds.pixel_array)


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_it_converts_ybr_to_rgb(name: str) -> None:
    ds = local(name)
    rendered = png_array(render.render(ds, 1, "preview"))
    assert np.array_equal(rendered, pixel_array(ds, as_rgb=True))
    assert not np.array_equal(rendered, pixel_array(ds, as_rgb=False))  # the YBR values themselves


def test_it_expands_palette_colour() -> None:
    ds = local("examples_palette.dcm")
    expected = (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8)
    assert np.array_equal(png_array(render.render(ds, 1, "preview")), expected)


def test_it_renders_each_frame_of_a_multiframe_image_and_refuses_one_too_many() -> None:
    ds = local("examples_ybr_color.dcm")  # 30 frames, JPEG baseline
    first, second = (png_array(render.render(ds, n, "preview")) for n in (1, 2))
    assert first.shape == second.shape and not np.array_equal(first, second)
    with pytest.raises(render.RenderError, match="frame 31 does not exist"):
        render.render(ds, 31, "preview")


def test_it_shrinks_thumbnails() -> None:
    ds = local("examples_rgb_color.dcm")
    thumbnail = png_array(render.render(ds, 1, "thumbnail"))
    assert max(thumbnail.shape[:2]) == render.THUMBNAIL_SIZE


def test_it_reports_what_it_cannot_decode() -> None:
    with pytest.raises(render.RenderError, match="cannot be decoded"):
        render.render(local("MR_truncated.dcm"), 1, "preview")
    ds = make_dataset()
    del ds.PixelData
    with pytest.raises(render.RenderError, match="no pixel data"):
        render.render(ds, 1, "preview")


# --------------------------------------------------------------------- the cache


def stored_instance(ds) -> Instance:
    result = ingest_bytes(part10(ds), Source(channel="test"))
    assert result.ok, result.reason
    return Instance.objects.get(pk=result.instance_id)


@pytest.mark.django_db
def test_it_caches_renditions_on_disk_and_serves_them_without_the_file(storage_dir: Path, settings) -> None:
    instance = stored_instance(make_dataset())
    made = render.rendition(instance, 1, "preview")
    assert made.path.is_file() and str(made.path).startswith(str(settings.PACS_RENDER_CACHE_DIR))
    assert instance.sop_instance_uid not in str(made.path)  # no UID (and no PHI) in cache paths
    (storage_dir / instance.file_path).unlink()  # from now on only the cache can answer
    assert render.rendition(instance, 1, "preview").path.read_bytes() == made.path.read_bytes()
    with pytest.raises(render.RenderError, match="missing"):
        render.rendition(instance, 1, "packed")


@pytest.mark.django_db
def test_it_keys_the_cache_by_the_file_so_a_replaced_file_is_rendered_again() -> None:
    instance = stored_instance(make_dataset())
    before = (render.cache_path(instance, 1, "packed"), render.etag(instance, 1, "packed"))
    instance.file_sha256 = "0" * 64
    assert (render.cache_path(instance, 1, "packed"), render.etag(instance, 1, "packed")) != before


@pytest.mark.django_db
def test_it_refuses_unknown_kinds_and_frames() -> None:
    instance = stored_instance(make_dataset())
    with pytest.raises(render.RenderError):
        render.rendition(instance, 1, "gif")
    with pytest.raises(render.RenderError):
        render.rendition(instance, 2, "preview")


@pytest.mark.django_db
def test_the_prerender_task_fills_the_cache_for_a_whole_series() -> None:
    from archive.tasks import prerender_series

    series_uid = pydicom.uid.generate_uid()
    instances = [stored_instance(make_dataset(series_uid=series_uid, study_uid="1.2.3.4")) for _ in range(3)]
    assert prerender_series(instances[0].series_id) == 3 * 2 + 1
    for instance in instances:
        assert render.cache_path(instance, 1, "preview").is_file()
        assert render.cache_path(instance, 1, "packed").is_file()
    assert prerender_series(instances[0].series_id) == 0  # nothing left to do


@pytest.mark.django_db
def test_a_finished_batch_of_stores_queues_one_prerender_task_per_series() -> None:
    from django_q.models import OrmQ

    from archive.ingest import announce_series

    first = stored_instance(make_dataset())
    second = stored_instance(make_dataset())
    OrmQ.objects.all().delete()
    announce_series(object(), {first.series_id, second.series_id})
    assert OrmQ.objects.count() == 2
    names = sorted(task.func() for task in OrmQ.objects.all() if hasattr(task, "func"))
    assert names == ["archive.tasks.prerender_series"] * 2


@pytest.mark.django_db
def test_the_jpeg_rendition_is_the_preview_as_jpeg() -> None:
    instance = stored_instance(make_dataset(rows=32, columns=32))
    made = render.rendition(instance, 1, "jpeg")
    picture = Image.open(made.path)
    assert picture.format == "JPEG" and picture.size == (32, 32) and made.path.suffix == ".jpg"


def test_a_window_given_by_the_caller_keeps_monochrome1_inverted() -> None:
    stored = np.array([[0, 4095]], dtype=np.int64)
    ds = grey_dataset(stored, bits_stored=12, signed=False, photometric="MONOCHROME1")
    assert render.windowed_pixels(ds, 1, (2048.0, 4096.0)).tolist() == [[255, 0]]
    ds.PhotometricInterpretation = "MONOCHROME2"
    assert render.windowed_pixels(ds, 1, (2048.0, 4096.0)).tolist() == [[0, 255]]


@pytest.mark.django_db(transaction=True)
def test_prerender_tasks_of_one_series_at_once_render_each_frame_once(monkeypatch) -> None:
    """A series stored over several associations queues a task from each: run at once,
    they must not render the same frames side by side."""
    from archive.tasks import prerender_series

    series_uid = pydicom.uid.generate_uid()
    instances = [stored_instance(make_dataset(series_uid=series_uid, study_uid="1.2.3.5")) for _ in range(4)]
    rendered: list[tuple[int, int, str]] = []
    real = render.render

    def counting(ds, frame, kind):
        rendered.append((str(ds.SOPInstanceUID), frame, kind))
        time.sleep(0.02)  # long enough for the other task to reach the same frames
        return real(ds, frame, kind)

    monkeypatch.setattr(render, "render", counting)
    made: list[int] = []

    def task() -> None:
        try:
            made.append(prerender_series(instances[0].series_id))
        finally:
            connection.close()

    run_together([task] * 2)
    frames = [r for r in rendered if r[2] in ("preview", "packed")]
    assert len(frames) == len(set(frames)) == 4 * 2  # preview and packed, each once
    assert sorted(made) == [0, 4 * 2 + 1]  # the second found everything done
