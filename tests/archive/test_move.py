"""C-MOVE and C-GET over real sockets: DCMTK's movescu, getscu and storescp, and pynetdicom."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive import storage
from archive.dimse import status
from archive.ingest import Source, ingest_file
from archive.models import Instance, RemoteNode
from tests.archive.test_query import load_corpus
from tests.conftest import dcmtk, free_port, run_dcmtk


@pytest.fixture
def qr(scp):
    load_corpus()
    return scp


@pytest.fixture
def storescp(tmp_path: Path):
    """DCMTK's storescp as the move destination, registered as a DICOM node."""
    started = []

    def start(*options: str, ae_title: str = "DEST") -> Path:
        folder = tmp_path / f"received-{len(started)}"
        folder.mkdir()
        port = free_port()
        process = subprocess.Popen(
            [dcmtk("storescp"), "+B", "-aet", ae_title, "-od", str(folder), *options, str(port)],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        for _ in range(100):
            if run_dcmtk("echoscu", "-aec", ae_title, "127.0.0.1", str(port), timeout=5).returncode == 0:
                break
            time.sleep(0.1)
        RemoteNode.objects.create(name=ae_title, ae_title=ae_title, host="127.0.0.1", port=port)
        return folder

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file, after its preamble and file meta group."""
    data = path.read_bytes()
    return data[144 + int.from_bytes(data[140:144], "little") :]


def c_move(scp, keys: dict, destination: str, model=StudyRootQueryRetrieveInformationModelMove):
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSPORTAL")
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    replies = [(reply, ident) for reply, ident in assoc.send_c_move(identifier, destination, model)]
    assoc.release()
    return replies


def test_movescu_to_storescp_sends_the_files_as_stored(qr, storescp) -> None:
    folder = storescp()
    result = run_dcmtk(
        "movescu", "-S", "-aec", "PACSPORTAL", "-aem", "DEST",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.9.1", "127.0.0.1", str(qr.port),
    )
    assert result.returncode == 0, result.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in folder.iterdir()}
    stored = {i.sop_instance_uid: storage.absolute(i.file_path) for i in Instance.objects.filter(series__study__study_instance_uid="1.2.9.1")}
    assert set(received) == set(stored) and len(stored) == 4
    for uid, path in stored.items():
        assert dataset_bytes(received[uid]) == dataset_bytes(path)  # byte for byte


def test_c_move_counts_every_sub_operation(qr, storescp) -> None:
    storescp()
    replies = c_move(qr, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2.9.1.1\\1.2.9.2.1"}, "DEST")
    pending = [r for r, _ in replies if r.Status == status.PENDING]
    final = replies[-1][0]
    assert final.Status == status.SUCCESS
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations, final.NumberOfWarningSuboperations) == (5, 0, 0)
    for reply in pending:  # progress, at most every PENDING_INTERVAL: always adding up
        assert reply.NumberOfRemainingSuboperations + reply.NumberOfCompletedSuboperations == 5


def test_pending_responses_show_progress(qr, storescp, monkeypatch) -> None:
    from archive.dimse import move

    monkeypatch.setattr(move, "PENDING_INTERVAL", 0)
    storescp()
    replies = c_move(qr, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2.9.1.1\\1.2.9.2.1"}, "DEST")
    pending = [r for r, _ in replies if r.Status == status.PENDING]
    assert [r.NumberOfRemainingSuboperations for r in pending] == [4, 3, 2, 1]
    assert [r.NumberOfCompletedSuboperations for r in pending] == [1, 2, 3, 4]


def test_a_compressed_file_is_transcoded_for_a_destination_that_takes_only_uncompressed(db, scp, storescp) -> None:
    source = Path(get_testdata_file("JPEG2000.dcm"))
    assert ingest_file(source, Source(channel="import")).ok
    folder = storescp()  # storescp accepts uncompressed syntaxes only, unless told otherwise
    replies = c_move(scp, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": pydicom.dcmread(source).StudyInstanceUID}, "DEST")
    assert replies[-1][0].Status == status.SUCCESS
    [received] = list(folder.iterdir())
    got, original = pydicom.dcmread(received), pydicom.dcmread(source)
    assert got.file_meta.TransferSyntaxUID != JPEG2000
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_a_compressed_file_goes_as_stored_when_the_destination_takes_it(db, scp, storescp) -> None:
    source = Path(get_testdata_file("JPEG2000.dcm"))
    assert ingest_file(source, Source(channel="import")).ok
    folder = storescp("+xa")  # accept all transfer syntaxes
    replies = c_move(scp, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": pydicom.dcmread(source).SOPInstanceUID}, "DEST", PatientRootQueryRetrieveInformationModelMove)
    assert replies[-1][0].Status == status.SUCCESS
    [received] = list(folder.iterdir())
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == JPEG2000
    assert dataset_bytes(received) == dataset_bytes(source)


def test_an_unknown_destination_is_refused(qr) -> None:
    replies = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "NOWHERE")
    final = replies[-1][0]
    assert final.Status == status.MOVE_DESTINATION_UNKNOWN
    assert "NOWHERE" in final.ErrorComment


def test_a_destination_that_is_down_fails_cleanly_with_counts(qr) -> None:
    RemoteNode.objects.create(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port())
    replies = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "DOWN")
    final, identifier = replies[-1]
    assert final.Status == status.UNABLE_TO_PERFORM_SUB_OPERATIONS
    assert final.NumberOfFailedSuboperations == 4
    assert final.NumberOfCompletedSuboperations == 0
    assert len(identifier.FailedSOPInstanceUIDList) == 4
    assert "cannot associate" in final.ErrorComment


def test_a_malformed_identifier_is_refused_with_a_reason(qr, storescp) -> None:
    storescp()
    final = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-01"}, "DEST")[-1][0]
    assert final.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "StudyDate" in final.ErrorComment


def test_known_nodes_only_refuses_a_caller_without_the_right(qr, storescp, settings) -> None:
    storescp()
    settings.PACS_QR_KNOWN_NODES_ONLY = True
    final = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "DEST")[-1][0]
    assert final.Status == status.NOT_AUTHORIZED


def test_c_get_sends_on_the_same_association(qr) -> None:
    received: list[Dataset] = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", qr.port, ae_title="PACSPORTAL", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.9.2"
    replies = [reply for reply, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert replies[-1].Status == status.SUCCESS
    assert replies[-1].NumberOfCompletedSuboperations == 2
    assert sorted(ds.InstanceNumber for ds in received) == [1, 2]


def test_dcmtk_getscu(qr, tmp_path: Path) -> None:
    folder = tmp_path / "got"
    folder.mkdir()
    result = run_dcmtk(
        "getscu", "-S", "-od", str(folder), "-aec", "PACSPORTAL",
        "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.9.1", "-k", "SeriesInstanceUID=1.2.9.1.1",
        "127.0.0.1", str(qr.port),
    )
    assert result.returncode == 0, result.stderr
    received = sorted(pydicom.dcmread(p).InstanceNumber for p in folder.iterdir())
    assert received == [1, 2, 3]


def test_c_cancel_stops_a_move(qr, storescp, monkeypatch) -> None:
    from archive.dimse import storescu

    real = storescu.Sender.store

    def slow(self, item, message_id):
        time.sleep(0.3)
        return real(self, item, message_id)

    monkeypatch.setattr(storescu.Sender, "store", slow)
    storescp()
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", qr.port, ae_title="PACSPORTAL")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.9.1\\1.2.9.2"
    statuses = []
    for reply, _ in assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove, msg_id=9):
        statuses.append(reply)
        if len(statuses) == 1:
            assoc.send_c_cancel(9, assoc.accepted_contexts[0].context_id)
    assoc.release()
    final = statuses[-1]
    assert final.Status == status.CANCEL
    assert final.NumberOfCompletedSuboperations < 6
    assert final.NumberOfRemainingSuboperations > 0


@pytest.fixture
def pynetdicom_destination():
    """A pynetdicom Storage SCP as the move destination, whose C-STORE handler the test picks."""
    servers = []

    def start(handler, ae_title: str = "PYDEST"):
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)]))
        RemoteNode.objects.create(name=ae_title, ae_title=ae_title, host="127.0.0.1", port=port)

    yield start
    for server in servers:
        server.shutdown()


def test_a_sub_operation_the_destination_refuses_is_counted_and_listed(qr, pynetdicom_destination) -> None:
    received = []

    def handler(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0xA700 if len(received) == 2 else 0x0000  # the second one: out of resources

    pynetdicom_destination(handler)
    replies = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "PYDEST")
    final, identifier = replies[-1]
    assert final.Status == status.SUB_OPERATIONS_WARNING
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 1)
    assert len(received) == 4 and identifier.FailedSOPInstanceUIDList == received[1]


def test_a_destination_that_aborts_midway_leaves_the_rest_failed_and_the_scp_serving(qr, pynetdicom_destination) -> None:
    received = []

    def handler(event):
        received.append(event.request.AffectedSOPInstanceUID)
        if len(received) == 2:
            event.assoc.abort()
        return 0x0000

    pynetdicom_destination(handler)
    replies = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "PYDEST")
    final, identifier = replies[-1]
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == 3
    assert len(identifier.FailedSOPInstanceUIDList) == 3
    assert final.Status == status.SUB_OPERATIONS_WARNING
    # The SCP goes on serving: the same move to a destination that behaves completes.
    ok = []
    pynetdicom_destination(lambda event: ok.append(1) or 0x0000, ae_title="PYDEST2")
    again = c_move(qr, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.9.1"}, "PYDEST2")
    assert again[-1][0].Status == status.SUCCESS and len(ok) == 4
