"""The REST API through DRF's test client: tokens, search with the query engine's matching,
status changes, labels, deletion with files, downloads, sends to a real DICOM peer, the
OpenAPI schema, and schemathesis generating requests from that schema."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from archive import storage
from archive.ingest import Source, ingest_bytes
from archive.models import AccessLabel, Instance, Patient, RemoteNode, SendJob, Study
from audit.models import AuditEvent
from tests.conftest import dcmtk, free_port, make_dataset, make_user, part10, run_dcmtk


def client_as(*roles: str, username: str | None = None, **fields) -> APIClient:
    user = make_user(username or "-".join(roles).lower() or "nobody", *roles, **fields)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def store(**kwargs) -> Instance:
    result = ingest_bytes(part10(make_dataset(**kwargs)), Source(channel="test"))
    assert result.ok, result.reason
    return Instance.objects.select_related("series__study__patient").get(pk=result.instance_id)


@pytest.fixture
def archive(db) -> dict[str, Instance]:
    return {
        "muller": store(patient_name="Müller^Hans", patient_id="P1", accession="A1", study_date="20240115", modality="CT"),
        "doe": store(patient_name="Doe^Jane", patient_id="P2", accession="A2", study_date="20240301", modality="MR"),
        "doe2": store(patient_name="Doe^Jane", patient_id="P2", accession="A3", study_date="20230101", modality="CR"),
    }


def accessions(response) -> list[str]:
    assert response.status_code == 200, response.content[:300]
    return [row["accession_number"] for row in response.json()["results"]]


def test_it_needs_credentials_and_answers_401_in_json(db) -> None:
    response = APIClient().get("/api/studies/")
    assert response.status_code == 401
    assert response.json()["detail"] and "Token" in response["WWW-Authenticate"]
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token nope")
    assert bad.get("/api/studies/").status_code == 401


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["A2", "A1", "A3"]),
        ({"PatientName": "muller*"}, ["A1"]),
        ({"PatientName": "DOE^JANE"}, ["A2", "A3"]),
        ({"StudyDate": "20240101-20241231"}, ["A2", "A1"]),
        ({"StudyDate": "-20231231"}, ["A3"]),
        ({"ModalitiesInStudy": "MR\\CR"}, ["A2", "A3"]),
        ({"AccessionNumber": "A?"}, ["A2", "A1", "A3"]),
        ({"PatientID": "P2", "ordering": "study_date"}, ["A3", "A2"]),
        ({"status": "ARRIVED", "limit": 1}, ["A2"]),
    ],
)
def test_it_searches_studies_as_the_query_engine_matches(archive, params: dict, expected: list[str]) -> None:
    assert accessions(client_as("RIS").get("/api/studies/", params)) == expected


def test_a_bad_filter_is_a_400_with_the_reason(archive) -> None:
    response = client_as("RIS").get("/api/studies/", {"StudyDate": "2024-13-45"})
    assert response.status_code == 400 and response.json()["query"]


def test_a_nul_character_in_a_filter_is_a_400(archive) -> None:
    # found by schemathesis: PostgreSQL refuses text holding NUL (a 500 before)
    response = client_as("RIS").get("/api/patients/", {"PatientName": "a\x00b"})
    assert response.status_code == 400 and "NUL" in response.json()["query"][0]


@pytest.mark.parametrize("params", [{"limit": 10**21}, {"offset": 10**21}, {"limit": -5}, {"offset": "x"}])
def test_huge_or_bad_paging_parameters_do_not_break_a_list(archive, params: dict) -> None:
    # found by schemathesis: a 22-digit limit reached SQLite as an integer it cannot hold
    response = client_as("RIS").get("/api/patients/", params)
    assert response.status_code == 200
    assert len(response.json()["results"]) <= 1000


def test_lists_page_and_every_level_is_there(archive) -> None:
    client = client_as("Radiologist")
    page = client.get("/api/studies/", {"limit": 2})
    assert page.json()["count"] == 3 and len(page.json()["results"]) == 2 and page.json()["next"]
    assert [p["patient_id"] for p in client.get("/api/patients/").json()["results"]] == ["P2", "P1"]
    study_uid = archive["doe"].series.study.study_instance_uid
    series = client.get("/api/series/", {"StudyInstanceUID": study_uid}).json()["results"]
    assert [s["modality"] for s in series] == ["MR"]
    instances = client.get("/api/instances/", {"SeriesInstanceUID": series[0]["series_instance_uid"]}).json()["results"]
    assert [i["sop_instance_uid"] for i in instances] == [archive["doe"].sop_instance_uid]
    one = client.get(f"/api/studies/{study_uid}/").json()
    assert one["patient"]["patient_name"] == "Doe^Jane" and one["number_of_study_related_instances"] == 1


def test_the_ris_changes_status_and_priority_and_others_may_not(archive) -> None:
    study = archive["muller"].series.study
    url = f"/api/studies/{study.study_instance_uid}/"
    assert client_as("Clinician").patch(url, {"status": "READ"}, format="json").status_code == 404  # not in scope
    radiologist_less = client_as("Technologist", username="tech")
    Study.objects.get(pk=study.pk).access_labels.add(_label_for("Technologist"))
    assert radiologist_less.patch(url, {"status": "READ"}, format="json").status_code == 403
    ris = client_as("RIS")
    response = ris.patch(url, {"status": "READ", "priority": "STAT"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "READ"
    assert ris.patch(url, {"status": "NONSENSE"}, format="json").status_code == 400
    study.refresh_from_db()
    assert (study.status, study.priority) == ("READ", "STAT")
    event = AuditEvent.objects.get(action="modify")
    assert event.details["before"]["status"] == "ARRIVED" and event.study_instance_uid == study.study_instance_uid


def _label_for(group: str) -> AccessLabel:
    label, _ = AccessLabel.objects.get_or_create(name=f"{group} label")
    label.groups.add(Group.objects.get(name=group))
    return label


def test_scope_applies_to_every_list(archive) -> None:
    Study.objects.get(pk=archive["doe"].series.study_id).access_labels.add(_label_for("Clinician"))
    client = client_as("Clinician")
    assert accessions(client.get("/api/studies/")) == ["A2"]
    assert [p["patient_id"] for p in client.get("/api/patients/").json()["results"]] == ["P2"]
    assert client.get("/api/series/").json()["count"] == 1
    assert client.get("/api/instances/").json()["count"] == 1
    assert client.get(f"/api/studies/{archive['muller'].series.study.study_instance_uid}/").status_code == 404


def test_an_administrator_deletes_a_study_with_its_files(archive, storage_dir) -> None:
    study = archive["muller"].series.study
    path = storage.absolute(archive["muller"].file_path)
    assert path.exists()
    assert client_as("Radiologist").delete(f"/api/studies/{study.study_instance_uid}/").status_code == 403
    admin = client_as("Administrator")
    assert admin.delete(f"/api/studies/{study.study_instance_uid}/").status_code == 204
    assert not Study.objects.filter(pk=study.pk).exists() and not Instance.objects.filter(pk=archive["muller"].pk).exists()
    assert not Patient.objects.filter(patient_id="P1").exists()
    assert not path.exists()
    assert AuditEvent.objects.filter(action="delete", study_instance_uid=study.study_instance_uid).exists()
    assert not any(p.is_file() for p in (storage_dir / ".trash").rglob("*"))


def test_deleting_one_series_keeps_the_study_counts_right(db, storage_dir) -> None:
    first = store(study_uid="1.2.3.9", modality="CT")
    second = store(study_uid="1.2.3.9", modality="MR")
    admin = client_as("Administrator")
    assert admin.delete(f"/api/series/{second.series.series_instance_uid}/").status_code == 204
    study = Study.objects.get(study_instance_uid="1.2.3.9")
    assert (study.number_of_study_related_series, study.number_of_study_related_instances, study.modalities_in_study) == (1, 1, "CT")
    assert study.study_size == first.file_size
    assert not storage.absolute(second.file_path).exists() and storage.absolute(first.file_path).exists()


def test_a_failed_delete_puts_the_files_back(archive, monkeypatch) -> None:
    from archive import deletion

    def broken(study_pk: int) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(deletion, "_remove_study", broken)
    path = storage.absolute(archive["muller"].file_path)
    with pytest.raises(RuntimeError):
        deletion.delete_study(archive["muller"].series.study)
    assert path.exists() and Instance.objects.filter(pk=archive["muller"].pk).exists()


def test_instance_files_download_for_those_who_may(archive) -> None:
    url = f"/api/instances/{archive['muller'].sop_instance_uid}/file/"
    response = client_as("Radiologist").get(url)
    assert response.status_code == 200 and response["Content-Type"] == "application/dicom"
    assert b"".join(response.streaming_content)[128:132] == b"DICM"
    assert client_as("RIS").get(url).status_code == 403
    assert AuditEvent.objects.filter(action="export").count() == 1


def test_labels_and_nodes_are_for_administrators(db) -> None:
    assert client_as("Radiologist").post("/api/nodes/", {"name": "x", "ae_title": "X", "host": "h", "port": 104}).status_code == 403
    admin = client_as("Administrator")
    created = admin.post("/api/nodes/", {"name": "ws", "ae_title": "WS1", "host": "10.0.0.2", "port": 104}, format="json")
    assert created.status_code == 201, created.content
    duplicate = admin.post("/api/nodes/", {"name": "ws2", "ae_title": "WS1", "host": "10.0.0.2", "port": 104}, format="json")
    assert duplicate.status_code == 400 and "ae_title" in duplicate.json()
    assert admin.post("/api/nodes/", {"name": "bad", "ae_title": "X" * 17, "host": "h", "port": 99999}, format="json").status_code == 400
    label = admin.post("/api/labels/", {"name": "Cardiology", "groups": ["Clinician"]}, format="json")
    assert label.status_code == 201 and label.json()["groups"] == ["Clinician"]
    assert AuditEvent.objects.filter(action="node-change").count() == 1
    assert AuditEvent.objects.filter(action="permission-change").count() == 1


def test_a_study_is_sent_to_a_node_by_a_queued_task(archive, tmp_path: Path, settings, monkeypatch) -> None:
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", True)  # the task runs in this process, as the worker would
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    peer = subprocess.Popen([dcmtk("storescp"), "-aet", "PEER", "-od", str(folder), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if run_dcmtk("echoscu", "-aec", "PEER", "127.0.0.1", str(port), timeout=5).returncode == 0:
                break
            time.sleep(0.1)
        RemoteNode.objects.create(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
        RemoteNode.objects.create(name="source only", ae_title="SRC", host="127.0.0.1", port=port, may_retrieve=False)
        client = client_as("Radiologist")
        study_uid = archive["doe"].series.study.study_instance_uid
        refused = client.post(f"/api/studies/{study_uid}/send/", {"node": "source only"}, format="json")
        assert refused.status_code == 400
        response = client.post(f"/api/studies/{study_uid}/send/", {"node": "peer"}, format="json")
        assert response.status_code == 202, response.content
        job = client.get(f"/api/sends/{response.json()['id']}/").json()
        assert (job["state"], job["total"], job["sent"], job["failed"]) == ("done", 1, 1, 0)
        assert len(list(folder.iterdir())) == 1
        assert client_as("Clinician").post(f"/api/studies/{study_uid}/send/", {"node": "peer"}, format="json").status_code in (403, 404)
    finally:
        peer.terminate()
        peer.wait(5)


def test_a_send_to_a_node_that_is_down_fails_with_a_reason(archive, monkeypatch) -> None:
    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "SYNC", True)
    RemoteNode.objects.create(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port())
    response = client_as("Radiologist").post(f"/api/series/{archive['doe'].series.series_instance_uid}/send/", {"node": "down"}, format="json")
    job = SendJob.objects.get(pk=response.json()["id"])
    assert job.state == "failed" and "did not accept" in job.error


def test_the_openapi_schema_and_docs(db) -> None:
    client = client_as("RIS")
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    document = schema.json()
    assert "/api/studies/{study_instance_uid}/send/" in document["paths"]
    parameters = {p["name"] for p in document["paths"]["/api/studies/"]["get"]["parameters"]}
    assert {"PatientName", "StudyDate", "ModalitiesInStudy", "status", "limit", "offset", "ordering"} <= parameters
    assert "401" in document["paths"]["/api/studies/"]["get"]["responses"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()


def test_schemathesis_finds_no_server_error(archive) -> None:
    """Requests generated from the OpenAPI schema (schemathesis): none may answer 5xx."""
    import hypothesis
    import schemathesis
    from django.test import Client

    token = Token.objects.create(user=make_user("fuzzer", "Administrator", is_staff=True, is_superuser=True)).key
    document = client_as("RIS").get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    schema = schemathesis.openapi.from_dict(document)
    http = Client()
    failures: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE":
            continue  # deleting what the other generated requests use would only test emptiness

        @hypothesis.settings(max_examples=25, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def check(case) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            url = kwargs["url"].replace("http://testserver", "")
            method = kwargs["method"].lower()
            body = kwargs.get("json")
            response = getattr(http, method)(
                url, data=body if body is not None else None, content_type="application/json",
                query_params=kwargs.get("params") or None, HTTP_AUTHORIZATION=f"Token {token}",
            )
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{method.upper()} {url} {kwargs.get('params')} {body!r}: {response.status_code}")

        check()
    assert failures == []
    assert len(calls) > 100 and {200, 400} <= set(calls)  # it did generate requests, good and bad
