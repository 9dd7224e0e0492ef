"""The ingest service: what gets stored, what is refused, and that files and rows always agree."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest
from django.db import DatabaseError, connection
from pydicom.data import get_testdata_file

from archive import ingest, storage
from archive.ingest import Expected, Outcome, Source, ingest_bytes, ingest_dataset, ingest_file
from archive.models import Instance, Patient, Series, Study
from tests.conftest import make_dataset, part10

SOURCE = Source(channel="import")


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if storage.INCOMING not in p.parts]


def assert_consistent(root: Path) -> None:
    """No file without a row, no row without a file, no temporary file left."""
    on_disk = {p.relative_to(root).as_posix() for p in stored_files(root)}
    in_db = set(Instance.objects.values_list("file_path", flat=True))
    assert on_disk == in_db
    incoming = root / storage.INCOMING
    # Nothing left in it, but for a running SCP's (empty) folder of datasets being received.
    left = [p for p in incoming.rglob("*") if not (p.is_dir() and p.name.startswith("pid-"))] if incoming.exists() else []
    assert left == []


@pytest.mark.django_db
def test_it_stores_an_instance_and_indexes_every_level(storage_dir: Path) -> None:
    ds = make_dataset(patient_name="Müller^Jürgen", charset="ISO_IR 100")
    data = part10(ds)
    result = ingest_bytes(data, SOURCE)
    assert result.outcome is Outcome.STORED, result.reason
    instance = Instance.objects.select_related("series__study__patient").get()
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.file_sha256 == hashlib.sha256(data).hexdigest()
    assert instance.file_size == len(data)
    assert storage.absolute(instance.file_path).read_bytes() == data  # kept as received
    assert ds.SOPInstanceUID not in instance.file_path  # the path never carries a UID
    assert instance.series.study.patient.patient_name == "Müller^Jürgen"
    assert instance.series.study.patient.patient_name_norm == "muller^jurgen"
    study = instance.series.study
    assert (study.number_of_study_related_series, study.number_of_study_related_instances) == (1, 1)
    assert study.study_size == len(data)
    assert study.modalities_in_study == "CT"
    assert instance.metadata["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_geometry_is_kept_as_numbers_by_the_first_and_the_following_instances_of_a_series() -> None:
    """The first instance of a series is indexed by the ORM's path, the next ones by the
    hot path's own statement (a series known to the cache): both keep the JSON columns."""
    first = make_dataset()
    second = make_dataset(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID)
    for z, ds in ((1.5, first), (-2.25, second)):
        ds.ImagePositionPatient = [-120.5, 80, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        assert ingest_bytes(part10(ds), SOURCE).outcome is Outcome.STORED
    rows = Instance.objects.order_by("image_position_patient__2").values_list(
        "image_position_patient", "image_orientation_patient"
    )
    assert list(rows) == [
        ([-120.5, 80.0, -2.25], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        ([-120.5, 80.0, 1.5], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
    ]


@pytest.mark.django_db
def test_counts_and_modalities_follow_each_new_series() -> None:
    study_uid = "1.2.3.4.5"
    for modality, series_uid, count in (("CT", "1.2.3.4.5.1", 3), ("MR", "1.2.3.4.5.2", 2)):
        for _ in range(count):
            assert ingest_dataset(make_dataset(modality=modality, study_uid=study_uid, series_uid=series_uid), SOURCE).ok
    study = Study.objects.get(study_instance_uid=study_uid)
    assert study.number_of_study_related_series == 2
    assert study.number_of_study_related_instances == 5
    assert study.modalities_in_study == "CT\\MR"
    assert study.study_size == sum(Instance.objects.values_list("file_size", flat=True))
    assert sorted(Series.objects.values_list("number_of_series_related_instances", flat=True)) == [2, 3]


@pytest.mark.django_db
def test_a_second_copy_is_a_duplicate_and_the_first_is_kept(storage_dir: Path) -> None:
    ds = make_dataset()
    first = part10(ds)
    assert ingest_bytes(first, SOURCE).outcome is Outcome.STORED
    ds.StudyDescription = "changed"
    result = ingest_dataset(ds, SOURCE)
    assert result.outcome is Outcome.DUPLICATE
    assert result.ok
    instance = Instance.objects.get()
    assert storage.absolute(instance.file_path).read_bytes() == first
    assert Study.objects.get().number_of_study_related_instances == 1
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_the_overwrite_policy_replaces_the_stored_copy(settings, storage_dir: Path) -> None:
    settings.PACS_DUPLICATE_POLICY = "overwrite"
    ds = make_dataset()
    assert ingest_dataset(ds, SOURCE).outcome is Outcome.STORED
    ds.PixelData = bytes(len(ds.PixelData))
    second = part10(ds)
    assert ingest_bytes(second, SOURCE).outcome is Outcome.STORED
    instance = Instance.objects.get()
    assert storage.absolute(instance.file_path).read_bytes() == second
    study = Study.objects.get()
    assert (study.number_of_study_related_instances, study.study_size) == (1, len(second))
    assert_consistent(storage_dir)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda ds: delattr(ds, "SOPInstanceUID"), "SOPInstanceUID is missing"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.abc"), "SeriesInstanceUID '1.2.abc' is not a valid UID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2." + "9" * 70), "StudyInstanceUID"),
        (lambda ds: delattr(ds, "SOPClassUID"), "SOPClassUID is missing"),
    ],
)
def test_it_rejects_datasets_without_valid_identifying_uids(storage_dir: Path, mutate, reason: str) -> None:
    ds = make_dataset()
    mutate(ds)
    result = ingest_dataset(ds, SOURCE)
    assert result.outcome is Outcome.REJECTED
    assert reason in result.reason
    assert Instance.objects.count() == Study.objects.count() == Patient.objects.count() == 0
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_it_rejects_truncated_and_non_dicom_bytes(storage_dir: Path) -> None:
    data = part10(make_dataset(rows=64, columns=64))
    truncated = ingest_bytes(data[:-100], SOURCE)
    assert truncated.outcome is Outcome.REJECTED
    assert "truncated" in truncated.reason
    junk = ingest_bytes(b"%PDF-1.4 not dicom" * 50, SOURCE)
    assert junk.outcome is Outcome.REJECTED
    assert "not a DICOM Part 10 file" in junk.reason
    empty = ingest_bytes(b"", SOURCE)
    assert empty.outcome is Outcome.REJECTED
    assert Instance.objects.count() == 0
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_it_refuses_a_dataset_that_is_not_what_the_request_announced() -> None:
    ds = make_dataset()
    result = ingest_dataset(ds, SOURCE, Expected(sop_class_uid=ds.SOPClassUID, sop_instance_uid="1.2.3"))
    assert result.outcome is Outcome.MISMATCH
    result = ingest_dataset(ds, SOURCE, Expected(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid=""))
    assert result.outcome is Outcome.MISMATCH
    assert Instance.objects.count() == 0


@pytest.mark.django_db
def test_a_series_cannot_move_to_another_study(storage_dir: Path) -> None:
    assert ingest_dataset(make_dataset(study_uid="1.2.3.1", series_uid="1.2.3.1.1"), SOURCE).ok
    result = ingest_dataset(make_dataset(study_uid="1.2.3.2", series_uid="1.2.3.1.1"), SOURCE)
    assert result.outcome is Outcome.REJECTED
    assert "another study" in result.reason
    assert Study.objects.count() == 1
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_a_full_disk_while_writing_stores_nothing(storage_dir: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "copy_to_temp", full)
    result = ingest_bytes(part10(make_dataset()), SOURCE)
    assert result.outcome is Outcome.OUT_OF_RESOURCES
    assert Instance.objects.count() == 0
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_a_full_disk_at_publication_leaves_neither_row_nor_file(storage_dir: Path, monkeypatch) -> None:
    def full(temp, relative):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "link_into_place", full)
    result = ingest_bytes(part10(make_dataset()), SOURCE)
    assert result.outcome is Outcome.OUT_OF_RESOURCES
    assert Instance.objects.count() == Study.objects.count() == Patient.objects.count() == 0
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_too_little_free_space_is_refused_before_writing(storage_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage, "disk_free", lambda path=None: 1000)
    result = ingest_bytes(part10(make_dataset()), SOURCE)
    assert result.outcome is Outcome.OUT_OF_RESOURCES
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_a_database_error_leaves_no_file(storage_dir: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(ingest, "_insert_instance", broken)
    result = ingest_bytes(part10(make_dataset()), SOURCE)
    assert result.outcome is Outcome.FAILED
    assert "database error" in result.reason
    monkeypatch.undo()
    assert Instance.objects.count() == Study.objects.count() == 0
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("warm_cache", [False, True])
def test_indexing_that_fails_after_the_file_is_in_place_removes_it(storage_dir: Path, monkeypatch, warm_cache) -> None:
    study_uid, series_uid = "1.2.826.0.1.3680043.10.7", "1.2.826.0.1.3680043.10.7.1"
    if warm_cache:  # the series' keys are cached: the fast path
        assert ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE).ok

    def lost(*args, **kwargs):
        raise DatabaseError("connection lost")

    if warm_cache and connection.vendor == "postgresql":
        # One statement inserts and counts (archive_add_instance): make it fail after the
        # function has run, so that the statement (its transaction) is rolled back whole.
        statements = ingest._sql(connection)
        failing = f"SELECT x FROM ({statements.add_instance} AS x OFFSET 0) s WHERE x / (x - x) > 0"
        monkeypatch.setitem(ingest._statements, "postgresql", dataclasses.replace(statements, add_instance=failing))
    elif warm_cache:
        # The insert and the counts on the sqlite3 connection itself: the series' count
        # fails after the insert, which must be rolled back with it.
        statements = ingest._sql(connection)
        failing = "UPDATE archive_no_such_table SET n = n + ?, b = b + ? WHERE id = ?"
        monkeypatch.setitem(ingest._statements, "sqlite", dataclasses.replace(statements, count_series_qmark=failing))
    else:
        monkeypatch.setattr(ingest, "_count", lost)
    result = ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE)
    assert result.outcome is Outcome.FAILED
    monkeypatch.undo()
    assert Instance.objects.count() == (1 if warm_cache else 0)
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
def test_a_stale_cached_series_is_recreated(storage_dir: Path) -> None:
    study_uid, series_uid = "1.2.826.0.1.3680043.10.8", "1.2.826.0.1.3680043.10.8.1"
    assert ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE).ok
    for path in stored_files(storage_dir):
        path.unlink()
    Study.objects.all().delete()  # deleted behind the cache's back
    result = ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE)
    assert result.outcome is Outcome.STORED, result.reason
    assert Series.objects.get().number_of_series_related_instances == 1
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_a_file_left_without_a_row_by_a_killed_process_is_replaced(storage_dir: Path) -> None:
    ds = make_dataset()
    orphan = storage.absolute(storage.relative_path_for(ds.SOPInstanceUID))
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half of an old file")
    os.utime(orphan, (0, 0))  # long ago
    result = ingest_dataset(ds, SOURCE)
    assert result.outcome is Outcome.STORED, result.reason
    assert orphan.read_bytes() == part10(ds)
    assert_consistent(storage_dir)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name",
    ["JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG-lossy.dcm", "image_dfl.dcm",
     "MR_small_bigendian.dcm", "JPGExtended.dcm", "MR_small_jp2klossless.dcm"],
)
def test_compressed_and_big_endian_files_are_stored_as_received(storage_dir: Path, name: str) -> None:
    path = Path(get_testdata_file(name))
    result = ingest_file(path, SOURCE)
    assert result.outcome is Outcome.STORED, result.reason
    instance = Instance.objects.get()
    assert storage.absolute(instance.file_path).read_bytes() == path.read_bytes()
    assert path.exists()  # an import copies; the source stays
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
def test_concurrent_stores_into_one_study_keep_exact_counts(storage_dir: Path) -> None:
    study_uid, threads, per_thread = "1.2.826.0.1.99", 4, 6
    datasets = [
        [make_dataset(study_uid=study_uid, series_uid=f"{study_uid}.{t}", modality=("CT", "MR")[t % 2]) for _ in range(per_thread)]
        for t in range(threads)
    ]
    # The same SOP instance sent by every thread at once must be stored exactly once.
    shared = part10(make_dataset(study_uid=study_uid, series_uid=f"{study_uid}.0"))
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work(batch) -> None:
        try:
            barrier.wait()
            results = [ingest_bytes(shared, SOURCE)] + [ingest_dataset(ds, SOURCE) for ds in batch]
            with lock:
                outcomes.extend(r.outcome for r in results)
        finally:
            connection.close()

    workers = [threading.Thread(target=work, args=(batch,)) for batch in datasets]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert outcomes.count(Outcome.STORED) == threads * per_thread + 1
    assert outcomes.count(Outcome.DUPLICATE) == threads - 1
    study = Study.objects.get(study_instance_uid=study_uid)
    assert study.number_of_study_related_instances == threads * per_thread + 1
    assert study.number_of_study_related_series == threads
    assert study.modalities_in_study == "CT\\MR"
    assert study.study_size == sum(Instance.objects.values_list("file_size", flat=True))
    for series in Series.objects.all():
        assert series.number_of_series_related_instances == series.instances.count()
    assert Patient.objects.count() == 1
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
def test_concurrent_stores_into_one_series_neither_deadlock_nor_lose_counts(storage_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="archive.ingest")
    study_uid, series_uid, threads, per_thread = "1.2.826.0.1.98", "1.2.826.0.1.98.1", 4, 10
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                result = ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE)
                with lock:
                    outcomes.append(result.outcome)
        finally:
            connection.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert outcomes == [Outcome.STORED] * threads * per_thread
    assert [r.getMessage() for r in caplog.records if "retried" in r.getMessage()] == []  # no deadlock
    series = Series.objects.get()
    assert series.number_of_series_related_instances == threads * per_thread
    assert Study.objects.get().number_of_study_related_instances == threads * per_thread
    assert_consistent(storage_dir)


@pytest.mark.django_db
def test_nul_characters_in_text_never_break_the_header_json(storage_dir: Path) -> None:
    ds = make_dataset()
    ds.StudyDescription = "CT\x00CHEST"
    ds.InstitutionName = "Saint\x00Luke"
    result = ingest_dataset(ds, SOURCE)
    assert result.outcome is Outcome.STORED, result.reason
    instance = Instance.objects.get()
    assert instance.metadata["00081030"]["Value"] == ["CTCHEST"]
    assert Study.objects.get().study_description == "CTCHEST"
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
def test_a_transaction_left_open_on_the_connection_neither_blocks_nor_swallows_the_next_store(storage_dir: Path) -> None:
    """The hot path works on the database connection itself: a transaction some failure
    left open there must neither make it fail (SQLite refuses a second BEGIN) nor take its
    insert in, uncommitted (PostgreSQL would run it inside)."""
    study_uid, series_uid = "1.2.826.0.1.3680043.10.11", "1.2.826.0.1.3680043.10.11.1"
    assert ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE).ok  # series cached
    connection.connection.execute("BEGIN")  # as a failure that skipped its ROLLBACK would leave it
    result = ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE)
    assert result.outcome is Outcome.STORED
    raw = connection.connection
    open_now = raw.in_transaction if connection.vendor == "sqlite" else raw.info.transaction_status != 0  # IDLE
    assert not open_now  # the store was committed
    assert Instance.objects.count() == 2
    assert_consistent(storage_dir)


@pytest.mark.django_db(transaction=True)
def test_the_hot_path_statement_is_prepared_once_per_connection(storage_dir: Path) -> None:
    """On PostgreSQL the one statement a stored instance costs is parsed and planned once
    per connection (Django turns psycopg's prepared statements off unless told); SQLite
    takes no such option."""
    study_uid, series_uid = "1.2.826.0.1.3680043.10.12", "1.2.826.0.1.3680043.10.12.1"
    for _ in range(3):  # the first creates the series; the next two take the hot path
        assert ingest_dataset(make_dataset(study_uid=study_uid, series_uid=series_uid), SOURCE).ok
    options = connection.settings_dict["OPTIONS"]
    if connection.vendor == "postgresql":
        assert options["prepare_threshold"] is not None
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT archive_add_instance(%%'")
            assert cursor.fetchone()[0] == 1
    else:
        assert "prepare_threshold" not in options
    assert Instance.objects.count() == 3
    assert_consistent(storage_dir)
