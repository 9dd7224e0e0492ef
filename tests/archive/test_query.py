"""The query engine: each matching kind at each level (PS3.4 C.2.2.2), as a table."""

from __future__ import annotations

import datetime as dt

import pytest

from archive import query
from archive.ingest import Source, ingest_dataset
from archive.query import QueryError
from tests.conftest import make_dataset

# (patient id, name, study, date, time, accession, [(series, modality, [instance numbers])])
CORPUS = [
    ("P1", "Müller^Jürgen", "1.2.9.1", "20240115", "101500", "A100", [("1.2.9.1.1", "CT", [1, 2, 3]), ("1.2.9.1.2", "SR", [1])]),
    ("P1", "Müller^Jürgen", "1.2.9.2", "20240301", "083000", "A101", [("1.2.9.2.1", "MR", [1, 2])]),
    ("P2", "Doe^Jane", "1.2.9.3", "20240131", "235900", "A200", [("1.2.9.3.1", "CT", [1])]),
    ("P3", "Yamada^Tarou=山田^太郎=やまだ^たろう", "1.2.9.4", "20231231", "120000", "B300", [("1.2.9.4.1", "US", [1, 2])]),
    ("P4", "DOE^JOHN", "1.2.9.5", "20240116", "000000", "A_1%", [("1.2.9.5.1", "CT", [7])]),
]
SOP = {"CT": "CT", "MR": "MR", "US": "US", "SR": "CT"}


def load_corpus() -> None:
    """Store CORPUS through the ingest service."""
    for pid, name, study, date, time, accession, series_list in CORPUS:
        for series, modality, numbers in series_list:
            for number in numbers:
                ds = make_dataset(
                    modality=SOP[modality], patient_id=pid, patient_name=name, study_uid=study, series_uid=series,
                    accession=accession, study_date=date, instance_number=number, charset="ISO_IR 192",
                )
                ds.StudyTime = time
                ds.Modality = modality
                assert ingest_dataset(ds, Source(channel="import")).ok


@pytest.fixture
def corpus(db) -> None:
    load_corpus()


def uids(level: str, keys: dict) -> set[str]:
    unique = query.UNIQUE_KEYS[level]
    return {answer[unique] for answer in query.find(level, {unique: "", **keys})}


@pytest.mark.parametrize(
    "level, keys, expected",
    [
        # single value
        ("STUDY", {"AccessionNumber": "A100"}, {"1.2.9.1"}),
        ("STUDY", {"PatientID": "P1"}, {"1.2.9.1", "1.2.9.2"}),
        ("STUDY", {"StudyDate": "20240131"}, {"1.2.9.3"}),
        # universal: the key is returned, not matched
        ("STUDY", {"StudyDescription": ""}, {"1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4", "1.2.9.5"}),
        # wildcards, with % and _ taken literally
        ("STUDY", {"AccessionNumber": "A1*"}, {"1.2.9.1", "1.2.9.2"}),
        ("STUDY", {"AccessionNumber": "A?00"}, {"1.2.9.1", "1.2.9.3"}),
        ("STUDY", {"AccessionNumber": "A_1%"}, {"1.2.9.5"}),
        ("STUDY", {"AccessionNumber": "A_*"}, {"1.2.9.5"}),
        ("STUDY", {"AccessionNumber": "*0*"}, {"1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4"}),
        # person names: case- and accent-insensitive, ^ components, groups, non-ASCII
        ("STUDY", {"PatientName": "muller^jurgen"}, {"1.2.9.1", "1.2.9.2"}),
        ("STUDY", {"PatientName": "MÜLLER*"}, {"1.2.9.1", "1.2.9.2"}),
        ("STUDY", {"PatientName": "doe^*"}, {"1.2.9.3", "1.2.9.5"}),
        ("STUDY", {"PatientName": "Doe^Jane^^^"}, {"1.2.9.3"}),
        ("STUDY", {"PatientName": "Doe"}, set()),
        ("STUDY", {"PatientName": "山田^太郎"}, {"1.2.9.4"}),
        ("STUDY", {"PatientName": "*山田*"}, {"1.2.9.4"}),
        ("STUDY", {"PatientName": "D?E^J*"}, {"1.2.9.3", "1.2.9.5"}),
        # date and time ranges, open ranges, combined date and time
        ("STUDY", {"StudyDate": "20240101-20240131"}, {"1.2.9.1", "1.2.9.3", "1.2.9.5"}),
        ("STUDY", {"StudyDate": "-20240115"}, {"1.2.9.1", "1.2.9.4"}),
        ("STUDY", {"StudyDate": "20240201-"}, {"1.2.9.2"}),
        ("STUDY", {"StudyTime": "10"}, {"1.2.9.1"}),
        ("STUDY", {"StudyTime": "0800-1100"}, {"1.2.9.1", "1.2.9.2"}),
        ("STUDY", {"StudyDate": "20240115-20240131", "StudyTime": "1200-2300"}, {"1.2.9.5"}),
        ("STUDY", {"StudyDate": "20240115-20240131", "StudyTime": "1000-"}, {"1.2.9.1", "1.2.9.3", "1.2.9.5"}),
        # list of UIDs
        ("STUDY", {"StudyInstanceUID": "1.2.9.1\\1.2.9.4"}, {"1.2.9.1", "1.2.9.4"}),
        # ModalitiesInStudy matches any series of the study
        ("STUDY", {"ModalitiesInStudy": "MR"}, {"1.2.9.2"}),
        ("STUDY", {"ModalitiesInStudy": "SR\\US"}, {"1.2.9.1", "1.2.9.4"}),
        # the other levels, hierarchical (unique keys of the levels above)
        ("PATIENT", {"PatientName": "doe*"}, {"P2", "P4"}),
        ("PATIENT", {"PatientBirthDate": "19700101"}, {"P1", "P2", "P3", "P4"}),
        ("SERIES", {"StudyInstanceUID": "1.2.9.1"}, {"1.2.9.1.1", "1.2.9.1.2"}),
        ("SERIES", {"Modality": "CT"}, {"1.2.9.1.1", "1.2.9.3.1", "1.2.9.5.1"}),
        ("SERIES", {"StudyInstanceUID": "1.2.9.1", "Modality": "C?"}, {"1.2.9.1.1"}),
        ("SERIES", {"PatientName": "yamada*"}, {"1.2.9.4.1"}),
    ],
)
def test_matching(corpus, level: str, keys: dict, expected: set[str]) -> None:
    assert uids(level, keys) == expected


def test_image_level_with_numbers_and_hierarchy(corpus) -> None:
    found = list(query.find("IMAGE", {"SeriesInstanceUID": "1.2.9.1.1", "InstanceNumber": "2", "SOPInstanceUID": ""}))
    assert len(found) == 1
    assert found[0]["InstanceNumber"] == 2
    assert found[0]["StudyInstanceUID"] == "1.2.9.1"  # unique keys of the levels above
    assert found[0]["SeriesInstanceUID"] == "1.2.9.1.1"
    assert len(list(query.find("IMAGE", {"StudyInstanceUID": "1.2.9.1"}))) == 4


def test_computed_return_keys(corpus) -> None:
    patient = next(
        query.find(
            "PATIENT",
            {
                "PatientID": "P1",
                "NumberOfPatientRelatedStudies": "",
                "NumberOfPatientRelatedSeries": "",
                "NumberOfPatientRelatedInstances": "",
            },
        )
    )
    assert (
        patient["NumberOfPatientRelatedStudies"],
        patient["NumberOfPatientRelatedSeries"],
        patient["NumberOfPatientRelatedInstances"],
    ) == (2, 3, 6)
    study = next(
        query.find(
            "STUDY",
            {
                "StudyInstanceUID": "1.2.9.1",
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedSeries": "",
                "NumberOfStudyRelatedInstances": "",
                "SOPClassesInStudy": "",
                "StudyDate": "",
                "StudyTime": "",
                "PatientName": "",
            },
        )
    )
    assert study["ModalitiesInStudy"] == ["CT", "SR"]
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert study["SOPClassesInStudy"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert (study["StudyDate"], study["StudyTime"]) == ("20240115", "101500")
    assert study["PatientName"] == "Müller^Jürgen"
    assert study["SpecificCharacterSet"] == "ISO_IR 192"  # an answer that is not ASCII
    series = next(query.find("SERIES", {"SeriesInstanceUID": "1.2.9.2.1", "NumberOfSeriesRelatedInstances": ""}))
    assert series["NumberOfSeriesRelatedInstances"] == 2
    assert "SpecificCharacterSet" not in series
    # the patient's counts asked for at a lower level (QIDO-RS includefield=all does this)
    below = next(query.find("SERIES", {"SeriesInstanceUID": "1.2.9.2.1", "NumberOfPatientRelatedStudies": ""}))
    assert below["NumberOfPatientRelatedStudies"] == 2


def test_unindexed_keys_come_from_the_stored_header(corpus) -> None:
    series = next(query.find("SERIES", {"SeriesInstanceUID": "1.2.9.2.1", "PixelSpacing": "", "PatientSex": ""}))
    assert series["PixelSpacing"] == [0.5, 0.5]
    study = next(query.find("STUDY", {"StudyInstanceUID": "1.2.9.1", "ReferringPhysicianName": "", "PatientAge": ""}))
    assert study["ReferringPhysicianName"] == "Ref^Doctor"
    assert study["PatientAge"] == ""
    # an unindexed key is returned but never narrows the answers
    assert uids("STUDY", {"PatientWeight": "99"}) == {"1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4", "1.2.9.5"}


def test_limits_and_exact_name_matching(corpus, settings) -> None:
    assert len(list(query.find("STUDY", {}, limit=2))) == 2
    settings.PACS_QUERY_NAME_MATCHING = "exact"
    assert uids("STUDY", {"PatientName": "muller^jurgen"}) == set()
    assert uids("STUDY", {"PatientName": "Müller^Jürgen"}) == {"1.2.9.1", "1.2.9.2"}


@pytest.mark.parametrize(
    "level, keys, message",
    [
        ("FRAME", {}, "unknown query level"),
        ("STUDY", {"StudyDate": "2024-01-01-"}, "more than one '-'"),
        ("STUDY", {"StudyDate": "20241301"}, "not a valid DA value"),
        ("STUDY", {"StudyDate": "20240201-20240101"}, "ends before it starts"),
        ("STUDY", {"StudyDate": "-"}, "has no bound"),
        ("STUDY", {"StudyTime": "25"}, "not a valid TM value"),
        ("STUDY", {"StudyInstanceUID": "1.2.abc"}, "not a UID"),
        ("STUDY", {"StudyInstanceUID": "\\".join(f"1.2.{i}" for i in range(1001))}, "at most 1000"),
        ("SERIES", {"SeriesNumber": "one"}, "not an integer"),
        ("STUDY", {"PatientName": b"DOE"}, "not a text value"),
        ("STUDY", {"StudyDescription": "x" * 20000}, "at most 10000"),
        ("STUDY", {f"Key{i}": "" for i in range(400)}, "at most 300"),
        ("STUDY", {"NumberOfStudyRelatedSeries": "3"}, "return key only"),
    ],
)
def test_unusable_identifiers_are_refused_with_a_reason(db, level: str, keys: dict, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        list(query.find(level, keys))


def test_prefix_matching_is_case_sensitive_for_codes(corpus) -> None:
    # AccessionNumber (SH) matches exactly, case included, on every database (PS3.4 C.2.2.2.4)
    assert uids("STUDY", {"AccessionNumber": "a1*"}) == set()
    assert uids("STUDY", {"AccessionNumber": "A10*"}) == {"1.2.9.1", "1.2.9.2"}


@pytest.mark.parametrize(
    "answer",
    [
        {"StudyInstanceUID": "1.2.3", "PatientName": "Müller^Hans=ミュラー^ハンス", "ModalitiesInStudy": ["CT", "MR"],
         "NumberOfStudyRelatedInstances": 3, "StudyDate": "20240115", "PatientBirthDate": "", "SpecificCharacterSet": "ISO_IR 192"},
        {"SOPInstanceUID": "1.2.3.4", "Rows": 512, "InstanceNumber": "7", "NumberOfFrames": ""},
    ],
)
def test_answers_encode_to_dicom_json_as_pydicom_does(answer: dict) -> None:
    assert query.answer_json({"QueryRetrieveLevel": "STUDY", **answer}) == query.answer_dataset(answer).to_json_dict()


def test_the_bound_after_a_prefix_is_the_next_string_in_code_point_order() -> None:
    assert query._after_prefix("ab") == "ac"
    assert query._after_prefix("a\U0010ffff") == "b"
    assert query._after_prefix("\U0010ffff") is None
    assert query._after_prefix("a\ud7ff") == "a\ue000"  # over the surrogates


def test_a_case_sensitive_prefix_matches_exactly_the_strings_that_start_with_it(corpus, settings) -> None:
    # a range of the column: as exact as LIKE, the characters around the bounds included
    assert uids("STUDY", {"AccessionNumber": "A1*"}) == {"1.2.9.1", "1.2.9.2"}
    assert uids("STUDY", {"AccessionNumber": "A100*"}) == {"1.2.9.1"}
    assert uids("STUDY", {"AccessionNumber": "A0*"}) == set()
    assert uids("STUDY", {"AccessionNumber": "A_1%*"}) == {"1.2.9.5"}
    settings.PACS_QUERY_NAME_MATCHING = "exact"
    assert uids("STUDY", {"PatientName": "Müller*"}) == {"1.2.9.1", "1.2.9.2"}
    assert uids("STUDY", {"PatientName": "Mülles*"}) == set()
    assert uids("STUDY", {"PatientName": "MÜLLER*"}) == set()
    assert uids("STUDY", {"PatientName": "Yamada^Tarou=山*"}) == {"1.2.9.4"}


@pytest.mark.django_db(transaction=True)
def test_a_kept_query_shape_runs_as_a_prepared_statement_on_postgresql() -> None:
    """On PostgreSQL a query of a known shape is a prepared statement with its values bound
    by the server, so that PostgreSQL plans it once a connection (a generic plan, which
    the name prefix's range can use an index in); SQLite has none."""
    from django.db import connection

    from archive import compiled

    load_corpus()
    compiled.clear()
    expected = {"DOE": {"1.2.9.3", "1.2.9.5"}, "MUL": {"1.2.9.1", "1.2.9.2"}, "YAM": {"1.2.9.4"}, "ZZZ": set()}
    for round_ in range(3):
        for prefix, studies in expected.items():
            assert uids("STUDY", {"PatientName": f"{prefix}*"}) == studies, (round_, prefix)
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans + custom_plans, generic_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %s AND statement LIKE %s",
            ["%patient_name_norm%", "%~>=~%"],
        )
        statements = cursor.fetchall()
    assert len(statements) == 1  # one statement for every value
    executions, generic = statements[0]
    assert executions == 11  # the first query of the shape is learnt through Django
    assert generic > 0  # PostgreSQL found its generic plan no worse: planned once


@pytest.mark.django_db(transaction=True)
def test_kept_query_shapes_are_not_prepared_when_the_settings_say_so() -> None:
    """PACS_DB_PREPARED_STATEMENTS off (psycopg's prepare_threshold None, for a pooler
    that cannot keep prepared statements): the same answers, and nothing prepared."""
    from django.db import connection

    from archive import compiled

    load_corpus()
    compiled.clear()
    connection.ensure_connection()
    if connection.vendor == "postgresql":
        connection.connection.prepare_threshold = None
    for _ in range(3):
        assert uids("STUDY", {"PatientName": "DOE*"}) == {"1.2.9.3", "1.2.9.5"}
    assert compiled.stats.hits >= 2
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s", ["%patient_name_norm%"])
            assert cursor.fetchone()[0] == 0


@pytest.mark.parametrize(
    "keyword, value, text",
    [
        ("StudyDate", dt.date(2024, 1, 5), "20240105"),
        ("StudyDate", dt.datetime(2024, 1, 5, 10, 30), "20240105"),  # a date subclass
        ("StudyTime", dt.time(7, 5, 3), "070503"),
        ("StudyTime", dt.time(7, 5, 3, 250), "070503.000250"),
        ("StudyDate", "20240105", "20240105"),
        ("NumberOfStudyRelatedSeries", 12, 12),
    ],
)
def test_column_values_take_their_dicom_string_forms(keyword, value, text) -> None:
    convert = query._conversion(query.ATTRIBUTES[keyword])
    assert (value if convert is None else convert(value)) == text
