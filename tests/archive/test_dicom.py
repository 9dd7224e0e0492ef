"""The pure pydicom helpers: UIDs, dates, names, character sets, whole-file checks."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.data import get_charset_files, get_testdata_file

from archive.dicom import (
    DicomFileError,
    extract_header,
    is_valid_uid,
    json_header,
    normalize_name,
    parse_da,
    parse_tm,
    read_part10,
    required_uid_errors,
)
from tests.conftest import make_dataset, write_part10


@pytest.mark.parametrize(
    "value, valid",
    [
        ("1.2.840.10008.1.2", True),
        ("0.1", True),
        ("1.2." + "3" * 60, True),  # 64 characters
        ("1.2." + "3" * 61, False),  # 65 characters
        ("1.02.3", False),  # leading zero in a component
        ("1..2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("", False),
        (" 1.2", False),
    ],
)
def test_it_validates_uids_as_ps3_5_9_1(value: str, valid: bool) -> None:
    assert is_valid_uid(value) is valid


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20240115", dt.date(2024, 1, 15)),
        ("2024.01.15", dt.date(2024, 1, 15)),
        ("20240230", None),
        ("00000000", None),
        ("2024011", None),
        ("", None),
    ],
)
def test_it_parses_da(value: str, expected: dt.date | None) -> None:
    assert parse_da(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("101500", dt.time(10, 15)),
        ("1015", dt.time(10, 15)),
        ("10", dt.time(10)),
        ("101500.123", dt.time(10, 15, 0, 123000)),
        ("10:15:00", dt.time(10, 15)),
        ("235960", dt.time(23, 59, 59)),
        ("250000", None),
        ("abc", None),
    ],
)
def test_it_parses_tm(value: str, expected: dt.time | None) -> None:
    assert parse_tm(value) == expected


def test_it_folds_names_for_matching() -> None:
    assert normalize_name("Müller^Jürgen") == "muller^jurgen"
    assert normalize_name("DOE^JANE") == "doe^jane"
    assert normalize_name("山田^太郎") == "山田^太郎"


@pytest.mark.parametrize(
    "charset, name",
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "山田^太郎"),
        ("ISO_IR 192", "Müller^Jürgen"),
        ("ISO_IR 144", "Люкceмбypг"),
        ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ],
)
def test_it_decodes_names_with_the_specific_character_set(tmp_path: Path, charset: str, name: str) -> None:
    path = write_part10(make_dataset(charset=charset, patient_name=name), tmp_path / "a.dcm")
    raw = path.read_bytes()
    assert name.encode("utf-8") not in raw or charset == "ISO_IR 192"  # really encoded in that charset
    header = extract_header(read_part10(path))
    assert header.patient["patient_name"] == name


@pytest.mark.parametrize(
    "name",
    ["chrH31.dcm", "chrX1.dcm", "chrGerm.dcm", "chrRuss.dcm", "chrArab.dcm", "chrI2.dcm"],
)
def test_it_reads_pydicoms_character_set_files(name: str) -> None:
    path = get_charset_files(name)[0]
    header = extract_header(read_part10(path))
    assert header.patient["patient_name"]
    assert "\x1b" not in header.patient["patient_name"]  # no escape sequences left over


def test_it_rejects_a_file_cut_in_its_pixel_data(tmp_path: Path) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomFileError, match="truncated"):
        read_part10(path)


def test_it_rejects_a_compressed_file_cut_before_its_delimiter(tmp_path: Path) -> None:
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-20])
    with pytest.raises(DicomFileError, match="truncated"):
        read_part10(path)


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_it_rejects_pydicoms_truncated_files(name: str) -> None:
    with pytest.raises(DicomFileError, match="truncated"):
        read_part10(get_testdata_file(name))


def test_it_rejects_what_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not DICOM\n" * 20)
    with pytest.raises(DicomFileError, match="not a DICOM Part 10 file"):
        read_part10(path)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG-lossy.dcm",
        "image_dfl.dcm",
        "SC_rgb_jpeg.dcm",  # encoded in implicit VR despite its explicit transfer syntax
        "examples_ybr_color.dcm",
    ],
)
def test_it_accepts_whole_files_in_any_transfer_syntax(name: str) -> None:
    ds = read_part10(get_testdata_file(name))
    assert required_uid_errors(extract_header(ds)) == []


def test_it_reports_missing_and_malformed_uids(tmp_path: Path) -> None:
    ds = make_dataset()
    del ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.03"
    header = extract_header(read_part10(write_part10(ds, tmp_path / "a.dcm")))
    problems = required_uid_errors(header)
    assert "SOPInstanceUID is missing" in problems
    assert any("StudyInstanceUID" in p and "not a valid UID" in p for p in problems)


def test_the_json_header_has_no_pixel_data_and_keeps_names(tmp_path: Path) -> None:
    ds = make_dataset(charset="ISO_IR 192", patient_name="山田^太郎")
    data = json_header(read_part10(write_part10(ds, tmp_path / "a.dcm")))
    assert "7FE00010" not in data
    assert data["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "山田^太郎"}]}
    assert data["00080018"]["Value"] == [ds.SOPInstanceUID]


def test_the_header_values_are_typed(tmp_path: Path) -> None:
    ds = make_dataset(instance_number=7, rows=32, columns=16)
    header = extract_header(read_part10(write_part10(ds, tmp_path / "a.dcm")))
    assert header.study["study_date"] == dt.date(2024, 1, 15)
    assert header.study["study_time"] == dt.time(10, 15)
    assert header.instance["instance_number"] == 7
    assert (header.instance["rows"], header.instance["columns"]) == (32, 16)
    assert header.instance["image_position_patient"] == [0.0, 0.0, 7.0]
    assert header.instance["number_of_frames"] == 1
    assert header.instance["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
