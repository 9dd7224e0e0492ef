"""C-FIND over real sockets: pynetdicom and DCMTK's findscu against the SCP."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.dimse import find as find_module
from archive.dimse import status
from tests.archive.test_query import load_corpus
from tests.conftest import run_dcmtk


@pytest.fixture
def qr(scp):
    load_corpus()
    return scp


def c_find(scp, level: str, keys: dict, model=StudyRootQueryRetrieveInformationModelFind, calling: str = "WORKSTATION"):
    """Send one C-FIND; return (answers, final status dataset)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSPORTAL")
    assert assoc.is_established
    identifier = Dataset()
    if any(isinstance(v, str) and not v.isascii() for v in keys.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers, final = [], None
    for reply, answer in assoc.send_c_find(identifier, model):
        if reply.Status in (status.PENDING, 0xFF01):
            answers.append(answer)
        else:
            final = reply
    assoc.release()
    return answers, final


def test_study_level_by_name_wildcard(qr) -> None:
    answers, final = c_find(qr, "STUDY", {"PatientName": "doe*", "StudyInstanceUID": "", "PatientID": "", "StudyDate": ""})
    assert final.Status == status.SUCCESS
    assert sorted((a.PatientID, a.StudyInstanceUID, a.StudyDate) for a in answers) == [
        ("P2", "1.2.9.3", "20240131"),
        ("P4", "1.2.9.5", "20240116"),
    ]
    assert all(a.RetrieveAETitle == "PACSPORTAL" and a.QueryRetrieveLevel == "STUDY" for a in answers)


def test_non_ascii_names_come_back_in_utf8(qr) -> None:
    answers, _ = c_find(qr, "STUDY", {"PatientName": "*山田*", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""})
    assert len(answers) == 1
    answer = answers[0]
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert answer.ModalitiesInStudy == "US"
    assert answer.NumberOfStudyRelatedInstances == 2


def test_patient_root_at_every_level(qr) -> None:
    model = PatientRootQueryRetrieveInformationModelFind
    patients, _ = c_find(qr, "PATIENT", {"PatientID": "P1", "PatientName": "", "NumberOfPatientRelatedStudies": ""}, model)
    assert [(p.PatientName, p.NumberOfPatientRelatedStudies) for p in patients] == [("Müller^Jürgen", 2)]
    studies, _ = c_find(qr, "STUDY", {"PatientID": "P1", "StudyInstanceUID": ""}, model)
    assert {s.StudyInstanceUID for s in studies} == {"1.2.9.1", "1.2.9.2"}
    series, _ = c_find(qr, "SERIES", {"PatientID": "P1", "StudyInstanceUID": "1.2.9.1", "SeriesInstanceUID": "", "Modality": ""}, model)
    assert {(s.SeriesInstanceUID, s.Modality) for s in series} == {("1.2.9.1.1", "CT"), ("1.2.9.1.2", "SR")}
    images, _ = c_find(
        qr,
        "IMAGE",
        {"PatientID": "P1", "StudyInstanceUID": "1.2.9.1", "SeriesInstanceUID": "1.2.9.1.1", "SOPInstanceUID": "", "InstanceNumber": ""},
        model,
    )
    assert sorted(i.InstanceNumber for i in images) == [1, 2, 3]


def test_study_root_refuses_the_patient_level(qr) -> None:
    answers, final = c_find(qr, "PATIENT", {"PatientID": ""})
    assert answers == []
    assert final.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "PATIENT" in final.ErrorComment


@pytest.mark.parametrize(
    "keys, comment",
    [
        ({"StudyDate": "20240230-"}, "StudyDate"),
        ({"StudyInstanceUID": "1.2.x"}, "not a UID"),
        ({"StudyTime": "99"}, "StudyTime"),
    ],
)
def test_malformed_identifiers_get_a_failure_with_a_comment(qr, keys: dict, comment: str) -> None:
    answers, final = c_find(qr, "STUDY", keys)
    assert answers == []
    assert final.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert comment in final.ErrorComment
    # the association and the SCP go on serving
    answers, final = c_find(qr, "STUDY", {"AccessionNumber": "A100"})
    assert len(answers) == 1 and final.Status == status.SUCCESS


def test_a_limit_cuts_the_answers_and_says_so(qr, settings, caplog) -> None:
    settings.PACS_FIND_LIMIT = 2
    caplog.set_level(logging.WARNING, logger="archive.dimse")
    answers, final = c_find(qr, "STUDY", {"StudyInstanceUID": ""})
    assert len(answers) == 2
    assert final.Status == status.SUCCESS
    assert any("cut at 2 answers" in r.getMessage() for r in caplog.records)


def test_c_cancel_stops_the_answers(qr, monkeypatch) -> None:
    real = find_module.encode_answer

    def slow(answer, **options):
        time.sleep(0.3)
        return real(answer, **options)

    monkeypatch.setattr(find_module, "encode_answer", slow)
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", qr.port, ae_title="PACSPORTAL")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind, msg_id=7)
    statuses = []
    for reply, _ in responses:
        statuses.append(reply.Status)
        if len(statuses) == 1:
            context_id = assoc.accepted_contexts[0].context_id
            assoc.send_c_cancel(7, context_id)
    assoc.release()
    assert statuses[-1] == status.CANCEL
    assert statuses.count(status.PENDING) < 5


def test_dcmtk_findscu(qr, tmp_path: Path) -> None:
    result = run_dcmtk(
        "findscu", "-S", "-X", "-od", str(tmp_path), "-aec", "PACSPORTAL",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=MÜLLER*", "-k", "StudyInstanceUID",
        "-k", "StudyDate=20240101-20240131", "-k", "SpecificCharacterSet=ISO_IR 192",
        "127.0.0.1", str(qr.port),
    )
    assert result.returncode == 0, result.stderr
    answers = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert [a.StudyInstanceUID for a in answers] == ["1.2.9.1"]
    assert str(answers[0].PatientName) == "Müller^Jürgen"


def test_dcmtk_findscu_series_level(qr, tmp_path: Path) -> None:
    result = run_dcmtk(
        "findscu", "-S", "-X", "-od", str(tmp_path), "-aec", "PACSPORTAL",
        "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.9.1", "-k", "SeriesInstanceUID",
        "-k", "Modality", "-k", "NumberOfSeriesRelatedInstances",
        "127.0.0.1", str(qr.port),
    )
    assert result.returncode == 0, result.stderr
    answers = sorted((pydicom.dcmread(p) for p in tmp_path.glob("rsp*.dcm")), key=lambda a: a.SeriesInstanceUID)
    assert [(a.SeriesInstanceUID, a.Modality, a.NumberOfSeriesRelatedInstances) for a in answers] == [
        ("1.2.9.1.1", "CT", 3),
        ("1.2.9.1.2", "SR", 1),
    ]


def test_known_nodes_only_refuses_unknown_and_unentitled_callers(qr, settings) -> None:
    from archive.models import RemoteNode

    settings.PACS_QR_KNOWN_NODES_ONLY = True
    RemoteNode.objects.create(name="Reading room", ae_title="READING", host="127.0.0.1", port=104)
    RemoteNode.objects.create(name="Modality", ae_title="CT01", host="127.0.0.1", port=104, may_query=False)
    for calling in ("STRANGER", "CT01"):
        answers, final = c_find(qr, "STUDY", {"StudyInstanceUID": ""}, calling=calling)
        assert answers == []
        assert final.Status == status.NOT_AUTHORIZED
        assert calling in final.ErrorComment
    answers, final = c_find(qr, "STUDY", {"StudyInstanceUID": ""}, calling="READING")
    assert len(answers) == 5 and final.Status == status.SUCCESS


def test_the_audit_event_follows_the_answers_and_is_written_by_the_stop(qr, monkeypatch) -> None:
    """The SCP's audit writer takes a C-FIND's event when its answers are known: the answers
    do not wait for the write, and a stop writes what is still queued."""
    import threading

    from archive.dimse import nodes
    from audit.models import AuditEvent

    gate = threading.Event()
    real = nodes._write

    def held(action: str, event: dict) -> None:
        gate.wait(30)
        real(action, event)

    monkeypatch.setattr(nodes, "_write", held)
    answers, final = c_find(qr, "STUDY", {"AccessionNumber": "A100", "StudyInstanceUID": ""}, calling="AUDITED")
    assert len(answers) == 1 and final.Status == status.SUCCESS  # answered while the write waits
    assert not AuditEvent.objects.filter(actor="AUDITED").exists()
    gate.set()
    qr.stop(timeout=5)
    event = AuditEvent.objects.get(actor="AUDITED", action="query")
    assert event.channel == "dimse" and event.details["answers"] == 1 and event.details["keys"]["AccessionNumber"] == "A100"


def test_the_audit_writer_writes_what_queued_meanwhile_in_one_batch(monkeypatch) -> None:
    """Events queued while the writer waits are written after that one wait, not one wait
    each (a busy node's events would otherwise pile up faster than they are written)."""
    import threading

    from archive.dimse import nodes

    written: list[str] = []
    waits: list[float] = []
    all_queued = threading.Event()

    def wait(seconds: float) -> None:
        waits.append(seconds)
        all_queued.wait(10)

    monkeypatch.setattr(nodes, "_write", lambda action, event: written.append(event["actor"]))
    writer = nodes.AuditWriter()
    writer._pause = wait
    for number in range(10):
        writer.submit("query", {"actor": f"AE{number}"})
    all_queued.set()
    writer.flush()
    writer.stop()
    assert written == [f"AE{number}" for number in range(10)]
    assert len(waits) <= 2  # the first batch, and at most one more for the stop


def test_c_find_is_read_by_the_fast_path(qr, monkeypatch) -> None:
    from archive.dimse import fastpath

    served: list[str] = []
    original = fastpath.PacsAssociation._serve_request
    monkeypatch.setattr(
        fastpath.PacsAssociation,
        "_serve_request",
        lambda self, msg, context_id: (
            served.append(type(msg).__name__) if self.is_acceptor else None,  # the SCP's side only
            original(self, msg, context_id),
        )[1],
    )
    keys = {"PatientName": "doe*", "StudyInstanceUID": ""}
    answers, final = c_find(qr, "STUDY", keys)
    assert final.Status == status.SUCCESS and len(answers) == 2
    answers, final = c_find(qr, "PATIENT", {"PatientID": "P2"}, model=PatientRootQueryRetrieveInformationModelFind)
    assert final.Status == status.SUCCESS and [a.PatientID for a in answers] == ["P2"]
    assert served == []  # neither went through pynetdicom's messages and Query/Retrieve service
    # A request of a FIND SOP class on another class's context is pynetdicom's to refuse.
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", qr.port, ae_title="PACSPORTAL")
    command = fastpath.wire.command_set(
        AffectedSOPClassUID=str(PatientRootQueryRetrieveInformationModelFind),
        CommandField=fastpath.wire.C_FIND_RQ,
        MessageID=3,
        Priority=0,
        CommandDataSetType=fastpath.wire.DATASET_PRESENT,
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = ""
    from pynetdicom.dsutils import encode

    fastpath.send_message(assoc, assoc.accepted_contexts[0].context_id, command, encode(identifier, False, True))
    deadline = time.monotonic() + 5
    while not served and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served == ["C_FIND"]
    if assoc.is_established:
        assoc.abort()


def test_the_first_answer_goes_out_before_the_others_are_built(qr, monkeypatch) -> None:
    """The peer reads the first answer while the archive builds the rest."""
    from archive import query
    from archive.dimse import fastpath

    events: list[str] = []
    build, write = query.QueryPlan.answer, fastpath.write

    def answer(self, *args, **kwargs):
        events.append("build")
        return build(self, *args, **kwargs)

    def sent(assoc, buffers):
        events.append("write")
        return write(assoc, buffers)

    monkeypatch.setattr(query.QueryPlan, "answer", answer)
    monkeypatch.setattr(fastpath, "write", sent)
    answers, final = c_find(qr, "STUDY", {"StudyInstanceUID": ""})
    assert final.Status == status.SUCCESS and len(answers) > 2
    assert events[:3] == ["build", "write", "build"]
    assert events.count("build") == len(answers)
