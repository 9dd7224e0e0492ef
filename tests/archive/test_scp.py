"""The SCP over real sockets: pynetdicom and DCMTK's storescu and echoscu as peers."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import threading
import time
from pathlib import Path

import pydicom
import pytest
from django.db import DatabaseError
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from pydicom.uid import ExplicitVRLittleEndian

from archive import ingest, storage
from archive.dimse import status, wire
from archive.dimse.server import Scp
from archive.models import Instance, Patient, Series, Study
from tests.archive.test_ingest import assert_consistent
from tests.conftest import SOP_FOR_MODALITY, make_dataset, run_dcmtk, run_together, write_part10


def associate(
    scp: Scp, calling: str = "MODALITY", called: str = "PACSPORTAL", contexts: list[str] | None = None, syntax: str = ""
):
    ae = AE(ae_title=calling)
    for uid in contexts or list(SOP_FOR_MODALITY.values()):
        if syntax:
            ae.add_requested_context(uid, [syntax])
        else:
            ae.add_requested_context(uid)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", scp.port, ae_title=called)


def test_it_answers_c_echo(scp: Scp) -> None:
    assoc = associate(scp)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    result = run_dcmtk("echoscu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr


def test_it_stores_every_modality_over_one_association(scp: Scp, storage_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="archive.dimse")
    study_uid = "1.2.826.0.1.3680043.10.1"
    assoc = associate(scp)
    for modality in ("CT", "MR", "CR", "US", "MG"):
        ds = make_dataset(modality=modality, study_uid=study_uid)
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    # The same instance again: a duplicate, kept once, still success for the modality.
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    study = Study.objects.get(study_instance_uid=study_uid)
    assert study.number_of_study_related_instances == 5
    assert study.number_of_study_related_series == 5
    assert study.modalities_in_study == "CR\\CT\\MG\\MR\\US"
    assert Instance.objects.count() == 5
    assert set(Instance.objects.values_list("source_ae_title", flat=True)) == {"MODALITY"}
    assert_consistent(storage_dir)
    ended = [r.getMessage() for r in caplog.records if "association released" in r.getMessage()]
    assert ended and "calling AE MODALITY" in ended[-1]
    assert "5 stored, 1 duplicates, 0 failed" in ended[-1]


@pytest.mark.parametrize(
    "charset, name",
    [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "山田^太郎"), ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎")],
)
def test_non_ascii_names_round_trip(scp: Scp, charset: str, name: str) -> None:
    assoc = associate(scp)
    assert assoc.send_c_store(make_dataset(charset=charset, patient_name=name)).Status == status.SUCCESS
    assoc.release()
    assert Patient.objects.get().patient_name == name


def send_file_as_is(scp: Scp, path: Path, sop_class: str):
    """Send a file's bytes without pynetdicom decoding them (its meta gives the command's UIDs)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(scp, contexts=[sop_class], syntax=ExplicitVRLittleEndian)
        reply = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return reply


def test_bad_input_gets_a_failure_status_with_a_reason(scp: Scp, storage_dir: Path, tmp_path: Path) -> None:
    # No SOPInstanceUID in the dataset (the command still names one, from the file meta).
    ds = make_dataset()
    del ds.SOPInstanceUID
    reply = send_file_as_is(scp, write_part10(ds, tmp_path / "no-uid.dcm"), ds.SOPClassUID)
    assert reply.Status == status.CANNOT_UNDERSTAND
    assert "SOPInstanceUID is missing" in reply.ErrorComment

    # A malformed Study Instance UID.
    ds = make_dataset()
    ds.StudyInstanceUID = "1.2.3.04"
    assoc = associate(scp)
    reply = assoc.send_c_store(ds)
    assoc.release()
    assert reply.Status == status.CANNOT_UNDERSTAND
    assert "StudyInstanceUID" in reply.ErrorComment

    # A dataset whose SOP Instance UID is not the one its request announced.
    ds = make_dataset()
    path = write_part10(ds, tmp_path / "other.dcm")
    ds.SOPInstanceUID = "1.2.3.4.5.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    ds.preamble = b"\0" * 128
    ds.save_as(tmp_path / "mismatch.dcm", enforce_file_format=False)  # keeps the meta as set
    reply = send_file_as_is(scp, tmp_path / "mismatch.dcm", ds.SOPClassUID)
    assert reply.Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS

    # A file cut short in its pixel data.
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-200])
    reply = send_file_as_is(scp, cut, ds.SOPClassUID)
    assert reply.Status == status.CANNOT_UNDERSTAND
    assert "truncated" in reply.ErrorComment

    # Meta information followed by something that is not a dataset.
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[: 144 + int.from_bytes(data[140:144], "little")] + b"\xff\xfe\x00\xe0" * 300)
    reply = send_file_as_is(scp, garbage, ds.SOPClassUID)
    assert reply.Status in (status.CANNOT_UNDERSTAND,)

    assert Instance.objects.count() == 0
    assert Study.objects.count() == 0
    assert_consistent(storage_dir)
    # The SCP is still serving.
    assoc = associate(scp)
    assert assoc.send_c_store(make_dataset()).Status == status.SUCCESS
    assoc.release()


def test_a_disk_that_fails_mid_write_gets_out_of_resources(scp: Scp, storage_dir: Path, monkeypatch) -> None:
    def full(temp, relative):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "link_into_place", full)
    assoc = associate(scp)
    reply = assoc.send_c_store(make_dataset())
    assoc.release()
    assert reply.Status == status.OUT_OF_RESOURCES
    assert Instance.objects.count() == Study.objects.count() == 0
    assert_consistent(storage_dir)


def test_a_database_failure_gets_a_processing_failure(scp: Scp, storage_dir: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise DatabaseError("database is locked")

    monkeypatch.setattr(ingest, "_insert_instance", broken)
    assoc = associate(scp)
    reply = assoc.send_c_store(make_dataset())
    assoc.release()
    assert reply.Status == status.PROCESSING_FAILURE
    assert "database error" in reply.ErrorComment
    monkeypatch.undo()
    assert Instance.objects.count() == 0
    assert_consistent(storage_dir)


def test_two_associations_storing_into_one_study_keep_exact_counts(scp: Scp, storage_dir: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.10.2"
    failures: list[int] = []

    def send(series: int) -> None:
        assoc = associate(scp, calling=f"MOD{series}")
        for _ in range(15):
            ds = make_dataset(study_uid=study_uid, series_uid=f"{study_uid}.{series}", modality=("CT", "MR")[series])
            reply = assoc.send_c_store(ds)
            if reply.Status != status.SUCCESS:
                failures.append(reply.Status)
        assoc.release()

    run_together([functools.partial(send, n) for n in (0, 1)], timeout=120)
    assert failures == []
    study = Study.objects.get(study_instance_uid=study_uid)
    assert study.number_of_study_related_instances == 30
    assert study.number_of_study_related_series == 2
    assert study.modalities_in_study == "CT\\MR"
    assert [s.number_of_series_related_instances for s in Series.objects.order_by("series_instance_uid")] == [15, 15]
    assert study.study_size == sum(Instance.objects.values_list("file_size", flat=True))
    assert_consistent(storage_dir)


STORESCU_CASES = [
    ("CT_small.dcm", []),
    ("MR_small_bigendian.dcm", ["-xb"]),
    ("JPEG2000.dcm", ["-xw"]),
    ("MR_small_jp2klossless.dcm", ["-xv"]),
    ("SC_rgb_rle.dcm", ["-xr"]),
    ("MR_small_jpeg_ls_lossless.dcm", ["-xt"]),
    ("JPEG-lossy.dcm", ["-xx"]),
    ("SC_rgb_jpeg_dcmtk.dcm", ["-xy"]),
    ("image_dfl.dcm", ["-xd"]),
]


@pytest.mark.parametrize("name, options", STORESCU_CASES)
def test_dcmtk_storescu_files_are_kept_as_sent(scp: Scp, storage_dir: Path, name: str, options: list[str]) -> None:
    path = Path(get_testdata_file(name))
    result = run_dcmtk("storescu", *options, "-aet", "DCMTK", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port), str(path))
    assert result.returncode == 0, result.stderr
    instance = Instance.objects.get()
    stored = storage.absolute(instance.file_path)
    sent, kept = pydicom.dcmread(path), pydicom.dcmread(stored)
    # Kept in its transfer syntax, pixel data untouched (never decoded or transcoded);
    # storescu re-encodes the rest (it drops group lengths and padding), so compare values.
    assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
    assert kept.PixelData == sent.PixelData
    def comparable(ds):
        skipped = (0xFFFCFFFC, 0x7FE00010)  # padding; pixel data compared above (its VR may change OW->OB)
        return [(e.tag, e.value) for e in ds if e.tag.element != 0 and e.tag not in skipped]

    assert comparable(kept) == comparable(sent)
    assert instance.source_ae_title == "DCMTK"
    assert_consistent(storage_dir)


def test_dcmtk_storescu_sends_a_folder_of_mixed_studies(scp: Scp, storage_dir: Path, tmp_path: Path) -> None:
    for i in range(12):
        write_part10(make_dataset(modality=("CT", "MR", "US")[i % 3], study_uid=f"1.2.826.0.1.77.{i % 2}"), tmp_path / f"{i}.dcm")
    result = run_dcmtk("storescu", "+sd", "+r", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port), str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert Instance.objects.count() == 12
    assert sorted(Study.objects.values_list("number_of_study_related_instances", flat=True)) == [6, 6]
    assert_consistent(storage_dir)


def test_it_checks_the_called_ae_title(scp: Scp) -> None:
    assoc = associate(scp, called="SOMEONE_ELSE")
    assert assoc.is_rejected
    result = run_dcmtk("echoscu", "-aec", "WRONG", "127.0.0.1", str(scp.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_a_received_file_goes_to_disk_once_it_is_all_in(scp: Scp, storage_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The receive file is handed to the disk (``storage.start_writeback``) once, whole,
    when its last fragment is written, and before it is read and indexed; the flush when
    the file is put in place still makes it durable."""
    ranges: list[tuple[int, int]] = []
    sizes: list[int] = []
    indexed_after: list[int] = []

    def writeback(fd: int, offset: int, length: int) -> None:
        ranges.append((offset, length))
        sizes.append(os.fstat(fd).st_size)
        storage.start_writeback(fd, offset, length)

    real_index = ingest._index_row

    def index_row(row):
        indexed_after.append(len(ranges))
        return real_index(row)

    assert scp.ae.pacs_writeback is storage.start_writeback  # PACS_SYNC_STORAGE is on
    monkeypatch.setattr(scp.ae, "pacs_writeback", writeback)
    monkeypatch.setattr(ingest, "_index_row", index_row)
    # 512 KB of pixels, which storescu sends in PDUs of at most 128 KB: several fragments
    sent = write_part10(make_dataset(rows=512, columns=512), tmp_path / "ct.dcm")
    result = run_dcmtk("storescu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port), str(sent))
    assert result.returncode == 0, result.stderr
    stored = storage.absolute(Instance.objects.get().file_path)
    assert ranges == [(0, stored.stat().st_size)]
    assert sizes == [stored.stat().st_size]
    assert indexed_after == [1]
    assert_consistent(storage_dir)


def test_without_sync_storage_nothing_is_handed_to_the_disk_early(transactional_db, settings) -> None:
    settings.PACS_SYNC_STORAGE = False
    server = Scp(ae_title="PACSPORTAL", port=0, bind="127.0.0.1")
    assert server.ae.pacs_writeback is None


def test_a_rejection_read_before_the_requestor_looks_is_still_a_rejection(scp: Scp) -> None:
    """pynetdicom's requestor checks that its connection came up after sending the
    request; a rejection read and acted on before that (the connection closed) must not
    read as a failed connection (an abort). The requestor is made slow to look."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    slow = [(evt.EVT_REQUESTED, lambda event: time.sleep(0.3))]
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SOMEONE_ELSE", evt_handlers=slow)
    assert assoc.is_rejected and not assoc.is_aborted
    assert assoc.acceptor.primitive.reason_str == "Called AE title not recognised"


def test_an_allow_list_refuses_unknown_calling_aes(transactional_db) -> None:
    scp = Scp(ae_title="PACSPORTAL", port=0, bind="127.0.0.1", allowed_calling_aets=["CT01"])
    scp.start()
    try:
        refused = associate(scp, calling="INTRUDER")
        assert refused.is_rejected
        allowed = associate(scp, calling="CT01")
        assert allowed.is_established
        assert allowed.send_c_store(make_dataset()).Status == status.SUCCESS
        allowed.release()
        result = run_dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port))
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    finally:
        scp.stop(timeout=5)
    assert Instance.objects.count() == 1


def test_associations_share_the_supported_contexts_without_changing_them(scp: Scp) -> None:
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    shared = scp.server.contexts
    before = [(c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role, c.context_id) for c in shared]
    plain = associate(scp)  # plain storage contexts, several syntaxes each
    assert plain.is_established
    plain.release()
    ae = AE(ae_title="GETTER")  # and one taking the SCP role, as a C-GET requester does
    ae.add_requested_context(SOP_FOR_MODALITY["CT"], [ExplicitVRLittleEndian])
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = SOP_FOR_MODALITY["CT"], False, True
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSPORTAL", ext_neg=[role])
    assert assoc.is_established and assoc.accepted_contexts
    assoc.release()
    after = [(c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role, c.context_id) for c in scp.server.contexts]
    assert scp.server.contexts is shared and after == before


def test_c_stores_are_read_by_the_fast_path_and_kept_byte_for_byte(
    scp: Scp, storage_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from archive.dimse import fastpath

    taken = []
    stores = []
    start = fastpath.PacsDIMSE._start

    def counting(self, command, context_id):
        store = start(self, command, context_id)
        taken.append(command["AffectedSOPInstanceUID"])
        stores.append(store)
        return store

    monkeypatch.setattr(fastpath.PacsDIMSE, "_start", counting)
    files = [write_part10(make_dataset(modality=m, rows=64, columns=64), tmp_path / f"{m}.dcm") for m in ("CT", "MR")]
    result = run_dcmtk("storescu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    # On one association: a C-ECHO and a C-FIND between C-STOREs still go pynetdicom's way.
    assoc = associate(scp, contexts=[SOP_FOR_MODALITY["US"], "1.2.840.10008.5.1.4.1.2.2.1"])
    us = make_dataset(modality="US")
    assert assoc.send_c_store(us).Status == status.SUCCESS
    assert assoc.send_c_echo().Status == status.SUCCESS
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = us.StudyInstanceUID
    answers = [ds for code, ds in assoc.send_c_find(query, "1.2.840.10008.5.1.4.1.2.2.1") if code and code.Status == 0xFF00]
    assert len(answers) == 1
    assert assoc.send_c_store(make_dataset(modality="US", study_uid=us.StudyInstanceUID)).Status == status.SUCCESS
    assoc.release()
    assert len(taken) == 4 and Instance.objects.count() == 4
    for path in files:
        sent = path.read_bytes()
        uid = pydicom.dcmread(path).SOPInstanceUID
        stored = storage.absolute(Instance.objects.get(sop_instance_uid=uid).file_path).read_bytes()
        # The data set exactly as sent, after File Meta Information that pydicom reads back.
        assert stored[wire.dataset_offset(stored) :] == sent[wire.dataset_offset(sent) :]
        meta = pydicom.dcmread(io.BytesIO(stored)).file_meta
        assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (uid, ExplicitVRLittleEndian)
    # The SHA-256 worked out while each file was received is the stored file's, and kept.
    for store in stores:
        instance = Instance.objects.get(sop_instance_uid=store.command["AffectedSOPInstanceUID"])
        assert store.sha256 == instance.file_sha256
        assert instance.file_sha256 == hashlib.sha256(storage.absolute(instance.file_path).read_bytes()).hexdigest()
    assert_consistent(storage_dir)


def test_a_data_set_cut_by_another_message_aborts_and_leaves_no_file(scp: Scp, storage_dir: Path) -> None:
    from archive.dimse import fastpath

    assoc = associate(scp, contexts=[SOP_FOR_MODALITY["CT"]])
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == SOP_FOR_MODALITY["CT"])
    ds = make_dataset()
    command = wire.c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID, 1)

    def pdu(header: int, value: bytes) -> bytes:
        return wire.PDU_HEADER.pack(wire.P_DATA_TF, 0, 6 + len(value)) + wire.PDV_HEADER.pack(2 + len(value), context_id, header) + value

    with fastpath.borrowed(assoc) as channel:
        # The command, a first (not last) data set fragment, then a command fragment instead of the rest.
        channel.sock.sendall(pdu(0x03, command) + pdu(0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100") + pdu(0x03, command))
        with pytest.raises(fastpath.Interrupted):
            channel.receive()  # the SCP aborts (PS3.8 9.3.8): no response comes
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted
    assert Instance.objects.count() == 0
    assert [p for p in storage.receive_dir().iterdir()] == []


def test_an_accepted_association_runs_in_one_thread_with_its_dul_inline(scp: Scp) -> None:
    from archive.dimse import fastpath

    assoc = associate(scp)
    server_assoc = next(a for a in scp.server.active_associations)
    assert isinstance(server_assoc.dul, fastpath.PacsDUL) and server_assoc.dul.inline
    assert not threading.Thread.is_alive(server_assoc.dul)  # no DUL thread was started
    assert assoc.send_c_echo().Status == status.SUCCESS
    stored = assoc.send_c_store(make_dataset(modality="CT"))
    assert stored.Status == status.SUCCESS
    assoc.release()
    assert assoc.is_released
    server_assoc.join(5)
    assert not server_assoc.is_alive()
    assert server_assoc.dul._kill_thread and server_assoc.dul.state_machine.current_state == "Sta1"
    assert server_assoc.dul.owner == server_assoc.ident  # the association's own thread ran it


def test_a_standby_association_takes_each_new_connection(scp: Scp) -> None:
    standby = scp.server.standby
    assert standby is not None
    deadline = time.monotonic() + 5
    while standby._assoc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    prepared = standby._assoc
    assert prepared is not None and prepared.is_alive() and prepared.name == "StandbyAcceptor"
    assert prepared not in scp.server.active_associations  # waiting, not serving
    assert prepared not in scp.ae.active_associations  # nor counted against the association limit
    assoc = associate(scp)
    assert assoc.is_established
    assert prepared.name.startswith("AcceptorThread") and prepared in scp.server.active_associations
    assert prepared.requestor.ae_title == "MODALITY"
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    # The next one is prepared after a moment; meanwhile connections build their own.
    while (standby._assoc is None or standby._assoc is prepared) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert standby._assoc is not None and standby._assoc is not prepared
    second, third = associate(scp), associate(scp)  # one takes the standby, the other is built
    assert second.is_established and third.is_established
    for a in (second, third):
        assert a.send_c_echo().Status == status.SUCCESS
        a.release()


def test_the_stop_ends_the_standby_and_aborts_inline_associations(transactional_db) -> None:
    server = Scp(ae_title="PACSPORTAL", port=0, bind="127.0.0.1")
    server.start()
    standby = server.server.standby
    deadline = time.monotonic() + 5
    while standby._assoc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    prepared = standby._assoc
    assert prepared is not None
    open_assoc = associate(server)  # left open: the stop must abort it
    assert open_assoc.is_established
    serving = list(server.server.active_associations)
    server.stop(timeout=5)
    assert not prepared.is_alive()
    assert not standby._thread.is_alive()
    for a in serving:
        a.join(5)
        assert not a.is_alive()
    deadline = time.monotonic() + 5
    while open_assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_assoc.is_aborted


def test_a_connection_closed_before_its_request_ends_its_thread_at_once(scp: Scp) -> None:
    import socket

    before = {t.ident for t in scp.server.active_associations}
    with socket.create_connection(("127.0.0.1", scp.port)):
        deadline = time.monotonic() + 5
        while not [t for t in scp.server.active_associations if t.ident not in before] and time.monotonic() < deadline:
            time.sleep(0.005)
        started = [t for t in scp.server.active_associations if t.ident not in before]
    assert started  # the connection got an association
    for thread in started:
        thread._started.wait(2)  # seen while still starting, maybe
        thread.join(2)  # not the 30 s ACSE timeout: nothing can come on a closed connection
        assert not thread.is_alive()
    assoc = associate(scp)  # and the SCP goes on serving
    assert assoc.is_established
    assoc.release()


def test_c_echo_is_answered_by_the_fast_path_unless_a_handler_is_bound(scp: Scp, monkeypatch) -> None:
    from pynetdicom import evt

    from archive.dimse import fastpath

    served: list[str] = []
    original = fastpath.PacsAssociation._serve_request
    monkeypatch.setattr(
        fastpath.PacsAssociation,
        "_serve_request",
        lambda self, msg, context_id: (served.append(type(msg).__name__), original(self, msg, context_id))[1],
    )
    assoc = associate(scp)
    assert assoc.send_c_echo(msg_id=7).Status == status.SUCCESS
    assert assoc.send_c_echo(msg_id=8).Status == status.SUCCESS
    assoc.release()
    assert served == []  # both answered without pynetdicom's Verification service

    scp.server.bind(evt.EVT_C_ECHO, lambda event: 0x0210)  # the prepared association is replaced
    assoc = associate(scp)
    assert assoc.send_c_echo().Status == 0x0210
    assoc.release()
    assert served == ["C_ECHO"]


def test_the_association_limit_counts_serving_associations_only(transactional_db) -> None:
    server = Scp(ae_title="PACSPORTAL", port=0, bind="127.0.0.1", max_associations=2)
    server.start()
    try:
        deadline = time.monotonic() + 5
        while server.server.standby._assoc is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first = associate(server)
        time.sleep(0.1)  # a new standby is prepared meanwhile
        assert server.server.standby._assoc is not None
        second = associate(server)
        assert first.is_established and second.is_established  # the prepared one does not count
        time.sleep(0.1)
        third = associate(server)
        assert third.is_rejected  # rejected-transient, local limit exceeded (PS3.8 9.3.4)
        for a in (first, second):
            a.release()
    finally:
        server.stop(timeout=5)


def test_a_known_association_request_is_answered_before_its_negotiation(scp: Scp, monkeypatch) -> None:
    from archive.dimse import fastpath

    early: list[bool] = []
    original = fastpath.PacsDUL._answer_early

    def answer_early(self, request: bytes) -> None:
        original(self, request)
        early.append(self._early is not None)

    monkeypatch.setattr(fastpath.PacsDUL, "_answer_early", answer_early)
    for _ in range(3):
        assoc = associate(scp)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == status.SUCCESS
        assert assoc.send_c_store(make_dataset(modality="CT")).Status == status.SUCCESS
        assoc.release()
    assert early == [False, True, True]  # the first request is negotiated, its answer kept
    other = associate(scp, calling="OTHER")  # other bytes: negotiated
    assert other.is_established
    other.release()
    rejected = associate(scp, called="SOMEONE")  # a rejection is never kept
    assert rejected.is_rejected
    rejected = associate(scp, called="SOMEONE")
    assert rejected.is_rejected
    assert early == [False, True, True, False, False, False]
    result = run_dcmtk("echoscu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port))
    result = run_dcmtk("echoscu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr
    assert early[-2:] == [False, True]


def test_associations_asking_at_once_with_the_same_request_are_negotiated_once(scp: Scp, monkeypatch) -> None:
    from pynetdicom import acse

    negotiated: list[int] = []
    original = acse.ACSE._negotiate_as_acceptor

    def slow(self) -> None:
        negotiated.append(threading.get_ident())
        time.sleep(0.2)  # the other requests arrive while this one is negotiated
        original(self)

    monkeypatch.setattr(acse.ACSE, "_negotiate_as_acceptor", slow)
    results: list[bool] = []

    def one() -> None:
        assoc = associate(scp, calling="BURST")
        results.append(assoc.is_established and assoc.send_c_echo().Status == status.SUCCESS)
        assoc.release()

    run_together([one] * 3, timeout=10)
    assert results == [True, True, True]
    assert len(negotiated) == 1  # the two others waited for its answer and replayed it
    assert associate(scp, calling="BURST2").is_established and len(negotiated) == 2  # other bytes


def test_a_known_request_replays_the_negotiation_that_answered_it(scp: Scp, monkeypatch) -> None:
    from pynetdicom import build_role
    from pynetdicom.sop_class import CTImageStorage

    from archive.dimse import fastpath

    replayed: list[bool] = []
    original = fastpath.PacsDUL.accepted_early

    def accepted_early(self, primitive) -> None:
        replayed.append(True)
        original(self, primitive)

    monkeypatch.setattr(fastpath.PacsDUL, "accepted_early", accepted_early)

    def request():
        ae = AE(ae_title="WORKSTATION")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context("1.2.826.0.1.3680043.10.99.1")  # unknown to the archive: rejected
        ae.add_requested_context(Verification)
        # A C-GET requester takes the Storage SCP role (PS3.7 D.3.3.4): a role selection item.
        return ae.associate("127.0.0.1", scp.port, ae_title="PACSPORTAL", ext_neg=[build_role(CTImageStorage, scp_role=True)])

    seen = []
    primitives = []
    for _ in range(2):
        assoc = request()
        assert assoc.is_established
        deadline = time.monotonic() + 5
        server_assoc = None
        while time.monotonic() < deadline:
            server_assoc = next((a for a in scp.server.active_associations if a.is_established), None)
            if server_assoc is not None:
                break
            time.sleep(0.01)
        assert server_assoc is not None
        seen.append(
            (
                sorted((cx.context_id, cx.abstract_syntax, cx.transfer_syntax[0], cx.as_scu, cx.as_scp) for cx in server_assoc.accepted_contexts),
                sorted((cx.context_id, cx.result) for cx in server_assoc.rejected_contexts),
                sorted((uid, item.scu_role, item.scp_role) for uid, item in server_assoc.acceptor.role_selection.items()),
                sorted((cx.context_id, cx.as_scu, cx.as_scp) for cx in assoc.accepted_contexts),
                sorted((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in server_assoc.requestor.requested_contexts),
                server_assoc.requestor.maximum_length,
            )
        )
        primitives.append(server_assoc.requestor.primitive)
        assert assoc.send_c_echo().Status == status.SUCCESS
        assoc.release()
        server_assoc.join(5)
    assert replayed == [True]  # the first was negotiated, the second replayed
    assert seen[0] == seen[1]
    # The second's request primitive is its own copy of the one kept, not shared with it.
    (known,) = scp.ae.pacs_negotiations._answers.values()
    assert known.primitive is not None and primitives[1] is not known.primitive
    assert primitives[1].presentation_context_definition_list[0] is not known.primitive.presentation_context_definition_list[0]
    accepted, rejected, roles, _, requested, _ = seen[1]
    assert len(requested) == 3
    assert len(accepted) == 2 and rejected and rejected[0][1] != 0x00
    assert roles == [(CTImageStorage, False, True)]
    assert (accepted[0][3], accepted[0][4]) == (True, False)  # the archive acts as SCU of CT storage here


def test_a_replay_that_fails_aborts_the_association_and_forgets_the_answers(scp: Scp, monkeypatch, caplog) -> None:
    from archive.dimse import fastpath

    assoc = associate(scp)
    assoc.release()
    assert scp.ae.pacs_negotiations._answers

    def broken(self, assoc) -> None:
        raise RuntimeError("broken")

    monkeypatch.setattr(fastpath.Outcome, "apply", broken)
    assoc = associate(scp)  # answered early, then the replay fails: the peer gets an abort
    deadline = time.monotonic() + 5
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted
    assert "replaying a known negotiation failed" in caplog.text
    assert scp.ae.pacs_negotiations._answers == {}
    monkeypatch.undo()
    assoc = associate(scp)  # negotiated again
    assert assoc.is_established and assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_a_known_answer_without_its_negotiation_is_checked_and_a_different_one_aborts(scp: Scp, caplog) -> None:
    from archive.dimse import fastpath

    assoc = associate(scp)
    assoc.release()
    negotiations = scp.ae.pacs_negotiations
    (request, known), = negotiations._answers.items()
    # As if the configuration had changed without clearing, and no negotiation were kept
    # to replay: the peer gets an answer negotiation would not give (another maximum PDU
    # length), then an abort.
    wrong = known.answer.replace(b"\x51\x00\x00\x04\x00\x00\x00\x00", b"\x51\x00\x00\x04\x00\x00\x40\x00")
    assert wrong != known.answer
    negotiations._answers[request] = fastpath.Known(wrong, known.decoded, None)
    assoc = associate(scp)
    deadline = time.monotonic() + 5
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted
    assert "answered before its negotiation, differently" in caplog.text
    assert negotiations._answers == {}
    for _ in range(2):  # negotiated again; kept by an association built after the clear
        assoc = associate(scp)
        assert assoc.is_established and assoc.send_c_echo().Status == status.SUCCESS
        assoc.release()
        time.sleep(0.1)
    assert list(negotiations._answers) == [request] and negotiations._answers[request].answer == known.answer


def test_changed_handlers_forget_the_known_answers(scp: Scp) -> None:
    from pynetdicom import evt

    assoc = associate(scp)
    assoc.release()
    assert scp.ae.pacs_negotiations._answers
    scp.server.bind(evt.EVT_REQUESTED, lambda event: None)
    assert scp.ae.pacs_negotiations._answers == {}
    assoc = associate(scp)
    assert assoc.is_established
    assoc.release()
    assert scp.ae.pacs_negotiations._answers == {}  # an EVT_REQUESTED handler may decide otherwise


def test_a_release_request_of_an_idle_association_is_answered_as_it_is_read(scp: Scp, monkeypatch, caplog) -> None:
    from archive.dimse import fastpath

    early: list[bool] = []
    original = fastpath.PacsDUL._release_early

    def release_early(self) -> None:
        original(self)
        early.append(self._released is not None)

    monkeypatch.setattr(fastpath.PacsDUL, "_release_early", release_early)
    caplog.set_level(logging.INFO, logger="archive.dimse")
    assoc = associate(scp)
    assert assoc.send_c_store(make_dataset(modality="CT")).Status == status.SUCCESS
    server_assoc = next(iter(scp.server.active_associations))
    assoc.release()
    assert assoc.is_released
    server_assoc.join(5)
    assert early == [True]
    assert server_assoc.is_released and not server_assoc.is_aborted
    assert "association released: calling AE MODALITY" in caplog.text and "1 stored" in caplog.text
    result = run_dcmtk("echoscu", "-aec", "PACSPORTAL", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr
    # echoscu may exit on the RP before the server's thread is back from sending it
    deadline = time.monotonic() + 5
    while len(early) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert early == [True, True]
