"""The retrieve service: the instances a request names, read or transcoded for a peer."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEGLSLossless

from archive import retrieve, storage
from archive.ingest import Source, ingest_file
from archive.query import QueryError
from archive.retrieve import RetrieveError
from tests.archive.test_query import corpus, load_corpus  # noqa: F401 - the fixture


@pytest.mark.parametrize(
    "level, keys, count",
    [
        ("PATIENT", {"PatientID": "P1"}, 6),
        ("STUDY", {"StudyInstanceUID": "1.2.9.1"}, 4),
        ("STUDY", {"StudyInstanceUID": "1.2.9.1\\1.2.9.3"}, 5),
        ("STUDY", {"PatientName": "doe*"}, 2),
        ("SERIES", {"SeriesInstanceUID": "1.2.9.2.1"}, 2),
        ("IMAGE", {"SeriesInstanceUID": "1.2.9.1.1", "InstanceNumber": "3"}, 1),
        ("STUDY", {"StudyInstanceUID": "9.9.9"}, 0),
    ],
)
def test_it_finds_the_instances_under_the_matched_rows(corpus, level: str, keys: dict, count: int) -> None:  # noqa: F811
    found = retrieve.instances(level, keys)
    assert len(found) == count
    assert all(storage.absolute(i.file_path).is_file() for i in found)


def test_instances_come_in_series_and_instance_order(corpus) -> None:  # noqa: F811
    found = retrieve.instances("STUDY", {"StudyInstanceUID": "1.2.9.1"})
    series_one = [i for i in found if i.sop_class_uid]
    assert len(series_one) == 4


def test_a_bad_identifier_is_refused(db) -> None:
    with pytest.raises(QueryError):
        retrieve.instances("STUDY", {"StudyDate": "not-a-date"})


@pytest.fixture
def jpeg2000(db) -> retrieve.StoredInstance:
    assert ingest_file(Path(get_testdata_file("JPEG2000.dcm")), Source(channel="import")).ok
    return retrieve.instances("IMAGE", {})[0]


def test_a_file_goes_as_stored_when_its_syntax_is_accepted(jpeg2000) -> None:
    ds = retrieve.load(jpeg2000, [JPEG2000, ExplicitVRLittleEndian])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000


def test_a_compressed_file_is_decompressed_for_a_peer_that_takes_only_uncompressed(jpeg2000) -> None:
    ds = retrieve.load(jpeg2000, [ImplicitVRLittleEndian])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_a_peer_without_a_usable_syntax_is_an_error(jpeg2000) -> None:
    with pytest.raises(RetrieveError, match="accepts neither"):
        retrieve.load(jpeg2000, [JPEGLSLossless])


def test_a_missing_file_is_an_error(jpeg2000) -> None:
    storage.absolute(jpeg2000.file_path).unlink()
    with pytest.raises(RetrieveError, match="cannot read"):
        retrieve.load(jpeg2000, [ExplicitVRLittleEndian])


def test_the_syntaxes_to_propose_put_the_stored_one_first(jpeg2000) -> None:
    wanted = retrieve.wanted_syntaxes([jpeg2000])
    assert wanted[jpeg2000.sop_class_uid][0] == JPEG2000
    assert ExplicitVRLittleEndian in wanted[jpeg2000.sop_class_uid]
