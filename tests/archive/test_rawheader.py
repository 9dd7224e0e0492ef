"""archive.rawheader: the header read straight from the bytes is what pydicom reads, or
the reader steps aside (None) and pydicom answers."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import config
import pydicom.data
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from archive import rawheader
from archive.dicom import DicomFileError, extract_header, json_header, parse_part10
from tests.conftest import make_dataset, part10

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def pydicom_answer(data: bytes):
    ds = parse_part10(io.BytesIO(data), len(data))
    return extract_header(ds), json_header(ds)


def fast_answer(data: bytes):
    answer = rawheader.read(data, len(data))
    assert answer is not None, "the reader stepped aside"
    return answer


def test_it_reads_pydicoms_own_test_files_as_pydicom_does() -> None:
    read_here = 0
    # The files pydicom ships (get_testdata_files would try to download more).
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        data = name.read_bytes()
        answer = rawheader.read(data, len(data))
        if answer is None:
            continue
        read_here += 1
        assert answer == pydicom_answer(data), name
    assert read_here >= 30  # JPEG, JPEG 2000, RLE, SR, RT, waveforms, private tags, ...


def _implicit(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _latin1(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Thorax ä ö ü ß"


def _utf8(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.InstitutionName = "東京病院"


def _multi_values(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.OtherPatientIDs = ["A1", "", "B2"]
    ds.WindowCenter = ["40", "-600.5"]
    ds.WindowWidth = ["400", "1.5e3"]
    ds.add_new(0x00101001, "PN", ["Doe^John", "Roe^Richard=Roe"])  # OtherPatientNames
    ds.add_new(0x00209165, "AT", [0x00100010, 0x00200013])  # DimensionIndexPointer


def _empty_values(ds: Dataset) -> None:
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = None
    ds.InstanceNumber = None
    ds.add_new(0x00280106, "US", None)  # SmallestImagePixelValue
    ds.add_new(0x00081140, "SQ", Sequence())  # ReferencedImageSequence, no items


def _numbers_and_binary(ds: Dataset) -> None:
    ds.add_new(0x00189082, "FD", 12.25)  # EffectiveEchoTime
    ds.add_new(0x00189087, "FD", [0.5, 1000.0])  # DiffusionBValue (as a list)
    ds.add_new(0x00181318, "DS", "3.5")  # dB/dt
    ds.add_new(0x00280034, "IS", ["1", "1"])  # PixelAspectRatio
    ds.add_new(0x00189219, "SS", -3)
    ds.add_new(0x00189220, "FL", 0.25)
    ds.add_new(0x00090010, "LO", "ACME 1.0")  # private creator
    ds.add_new(0x00091001, "OB", b"\x01\x02\x03\x04")  # inline
    ds.add_new(0x00091002, "OB", bytes(range(256)) * 4)  # bulk data: a BulkDataURI
    ds.add_new(0x00091003, "SL", [-1, 2])
    ds.add_new(0x00091004, "UL", 7)
    ds.add_new(0x00091005, "UT", "a long text   ")
    ds.add_new(0x00091006, "UR", "http://example.org/a ")
    ds.add_new(0x00091007, "ST", "  leading spaces kept")
    ds.add_new(0x00091008, "LT", "line one\r\nline two")
    ds.add_new(0x00091009, "AE", " STORESCU ")
    ds.add_new(0x0009100A, "AS", "045Y")
    ds.add_new(0x0009100B, "DT", "20240115101500.123")
    ds.add_new(0x0009100C, "TM", "1015")


def _sequences(ds: Dataset) -> None:
    first = Dataset()
    first.ReferencedSOPClassUID = ds.SOPClassUID
    first.ReferencedSOPInstanceUID = "1.2.3.4"
    second = Dataset()
    second.SpecificCharacterSet = "ISO_IR 100"  # an item with its own character set
    second.add_new(0x0040A123, "PN", "Müller^Jürgen")  # PersonName
    inner = Dataset()
    inner.CodeValue = "T-D3000"
    inner.CodingSchemeDesignator = "SRT"
    inner.CodeMeaning = "Chest"
    second.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([first, Dataset()])
    ds.add_new(0x0040A730, "SQ", Sequence([second]))  # ContentSequence
    ds.ProcedureCodeSequence = Sequence([inner])
    # Defined lengths for one sequence and its item (pydicom writes undefined ones by default).
    ds["ProcedureCodeSequence"].is_undefined_length = False
    ds.ProcedureCodeSequence[0].is_undefined_length_sequence_item = False


def _not_an_image(ds: Dataset) -> None:
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.file_meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)


def _trailing_padding(ds: Dataset) -> None:
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)  # DataSetTrailingPadding, after the pixel data


@pytest.mark.parametrize(
    "change",
    [
        lambda ds: None,
        _implicit,
        _latin1,
        _utf8,
        _multi_values,
        _empty_values,
        _numbers_and_binary,
        _sequences,
        _not_an_image,
        _trailing_padding,
    ],
    ids=lambda f: getattr(f, "__name__", "plain").strip("_"),
)
def test_it_reads_what_pydicom_reads(change) -> None:
    ds = make_dataset()
    change(ds)
    data = part10(ds)
    assert fast_answer(data) == pydicom_answer(data)


def test_names_round_trip_unchanged() -> None:
    ds = make_dataset(patient_name="Yamada^Tarou=山田^太郎", charset="ISO_IR 192")
    header, metadata = fast_answer(part10(ds))
    assert header.patient["patient_name"] == "Yamada^Tarou=山田^太郎"
    assert metadata["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]}


def _iso2022(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"


def _unknown_vr(ds: Dataset) -> None:
    ds.add_new(0x00091001, "UN", b"\x01\x02")


def _long_lo(ds: Dataset) -> None:
    ds.StudyDescription = "x" * 70  # LO is at most 64 characters: invalid, read strictly


def _long_ds(ds: Dataset) -> None:
    ds.add_new(0x00181318, "DS", "1.23456789012345678")  # DS is at most 16 characters


@pytest.mark.parametrize("change", [_iso2022, _unknown_vr, _long_lo, _long_ds], ids=lambda f: f.__name__.strip("_"))
def test_it_steps_aside_for_what_it_does_not_read_and_pydicom_answers(change) -> None:
    ds = make_dataset()
    with config.disable_value_validation():
        change(ds)
        data = part10(ds)
    assert rawheader.read(data, len(data)) is None
    assert rawheader.indexed(data, len(data)) == pydicom_answer(data)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan_truncated.dcm"])
def test_big_endian_deflated_and_truncated_files_go_to_pydicom(name) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    assert rawheader.read(data, len(data)) is None


def test_a_file_cut_short_is_refused_with_pydicoms_reason() -> None:
    data = part10(make_dataset(rows=64, columns=64))
    for cut in (data.index(b"CHEST") + 2, len(data) - 100):  # in a header value, in the pixel data
        assert rawheader.read(data[:cut], cut) is None
        with pytest.raises(DicomFileError, match="truncated"):
            rawheader.indexed(data[:cut], cut)


def test_an_image_without_pixel_data_is_refused() -> None:
    ds = make_dataset()
    del ds.PixelData
    data = part10(ds)
    with pytest.raises(DicomFileError, match="an image without Pixel Data"):
        rawheader.read(data, len(data))


def test_the_patient_study_and_series_values_come_only_from_the_keys_they_are_kept_under() -> None:
    """header_from_values works a series' upper levels out once per set of values
    (dicom._UPPER_KEYWORDS): they must be made of those keywords only."""
    from archive import dicom

    asked: list[str] = []

    def get(keyword: str):
        asked.append(keyword)
        return None

    dicom._patient_values(get), dicom._study_values(get), dicom._series_values(get)
    assert set(asked) <= set(dicom._UPPER_KEYWORDS)


def test_instances_of_one_series_share_upper_levels_but_keep_their_own_values() -> None:
    first = make_dataset(instance_number=1)
    first.SeriesDescription = "Axial"
    first.ImagePositionPatient = [0, 0, 1]
    second = make_dataset(instance_number=2, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID)
    second.SeriesDescription = "Axial"
    second.ImagePositionPatient = [0, 0, 2]
    # The same series with one series-level value changed: not the first one's values.
    third = make_dataset(instance_number=3, study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID)
    third.SeriesDescription = "Coronal"
    headers = []
    for ds in (first, second, third):
        data = part10(ds)
        header, _ = fast_answer(data)
        assert header == pydicom_answer(data)[0]
        headers.append(header)
    one, two, three = headers
    assert three.series["series_description"] == "Coronal"
    one.series["series_description"] = "changed by a caller"
    assert two.series["series_description"] == "Axial"  # each header has its own dicts
    assert (one.instance["instance_number"], two.instance["instance_number"]) == (1, 2)
    assert two.instance["image_position_patient"] == [0.0, 0.0, 2.0]
