"""DICOMweb with the real dicomweb-client library against a live server: QIDO-RS, WADO-RS,
STOW-RS and WADO-URI, authentication, access scope and bad bodies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import JPEG2000Lossless, generate_uid

from archive.ingest import Source, ingest_bytes, ingest_file
from archive.models import AccessLabel, Instance
from audit.models import AuditEvent
from tests.conftest import make_dataset, make_user, part10

PASSWORD = "dicomweb passphrase 1"
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture
def server(live_server, transactional_db, settings):
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    make_user("rad", "Radiologist", "Technologist", password=PASSWORD)
    return live_server


def client_for(server, user: str = "rad", password: str = PASSWORD) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (user, password)
    return DICOMwebClient(url=f"{server.url}/dicom-web", session=session)


def store(**kwargs) -> pydicom.Dataset:
    ds = make_dataset(**kwargs)
    assert ingest_bytes(part10(ds), Source(channel="test")).ok
    return ds


@pytest.fixture
def corpus(server):
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [store(study_uid=study_uid, series_uid=series_uid, patient_name="Müller^Hans", patient_id="P-WEB",
                    accession="WEB1", instance_number=n, rows=8, columns=8) for n in (1, 2, 3)]
    other = store(patient_name="Doe^Jane", patient_id="P-DOE", accession="WEB2", modality="MR")
    return {"study": study_uid, "series": series_uid, "slices": slices, "other": other}


def tag(answer: dict, keyword: str):
    from pydicom.datadict import tag_for_keyword

    element = answer.get(f"{tag_for_keyword(keyword):08X}", {})
    values = element.get("Value") or []
    return values[0] if values else None


# ------------------------------------------------------------------------- QIDO-RS


def test_qido_searches_every_level_with_filters(corpus, server) -> None:
    client = client_for(server)
    studies = client.search_for_studies(search_filters={"PatientName": "muller*"})
    assert [tag(s, "StudyInstanceUID") for s in studies] == [corpus["study"]]
    assert tag(studies[0], "PatientName") == {"Alphabetic": "Müller^Hans"}
    assert tag(studies[0], "NumberOfStudyRelatedInstances") == 3
    assert tag(studies[0], "RetrieveURL").endswith(f"/dicom-web/studies/{corpus['study']}")
    assert len(client.search_for_studies()) == 2
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == 1
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    series = client.search_for_series(corpus["study"])
    assert [tag(s, "SeriesInstanceUID") for s in series] == [corpus["series"]]
    assert len(client.search_for_series(search_filters={"Modality": "MR"})) == 1
    instances = client.search_for_instances(corpus["study"], corpus["series"])
    assert sorted(tag(i, "InstanceNumber") for i in instances) == [1, 2, 3]
    assert len(client.search_for_instances(corpus["study"])) == 3
    assert len(client.search_for_instances()) == 4
    page = client.search_for_instances(corpus["study"], limit=2, offset=1)
    assert len(page) == 2


def test_qido_includefield_fuzzymatching_and_tags(corpus, server) -> None:
    client = client_for(server)
    found = client.search_for_studies(search_filters={"00100020": "P-WEB"}, fields=["PatientSex", "InstitutionName"], fuzzymatching=True)
    assert len(found) == 1 and tag(found[0], "PatientSex") == "F"
    everything = client.search_for_studies(search_filters={"PatientID": "P-WEB"}, fields=["all"])
    assert tag(everything[0], "StudyDescription") == "CT study"


def test_qido_refuses_a_bad_query_with_400(corpus, server) -> None:
    session = requests.Session()
    session.auth = ("rad", PASSWORD)
    for query in ("StudyDate=2024-13-99", "NotAKeyword=1", "limit=-1", "PatientName=" + "x" * 20000):
        response = session.get(f"{server.url}/dicom-web/studies?{query}")
        assert response.status_code == 400, query
        assert response.json()["error"]


# ------------------------------------------------------------------------- WADO-RS


def test_wado_retrieves_studies_series_and_instances(corpus, server) -> None:
    client = client_for(server)
    study = client.retrieve_study(corpus["study"])
    assert sorted(ds.InstanceNumber for ds in study) == [1, 2, 3]
    series = client.retrieve_series(corpus["study"], corpus["series"])
    assert len(series) == 3
    first = corpus["slices"][0]
    instance = client.retrieve_instance(corpus["study"], corpus["series"], first.SOPInstanceUID)
    assert instance.SOPInstanceUID == first.SOPInstanceUID
    assert np.array_equal(instance.pixel_array, first.pixel_array)


def test_wado_transcodes_compressed_instances_unless_any_syntax_is_accepted(server) -> None:
    result = ingest_file(TEST_FILES / "MR_small_jp2klossless.dcm", Source(channel="test"))
    assert result.ok
    row = Instance.objects.select_related("series__study").get(pk=result.instance_id)
    client = client_for(server)
    args = (row.series.study.study_instance_uid, row.series.series_instance_uid, row.sop_instance_uid)
    plain = client.retrieve_instance(*args, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert plain.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    as_stored = client.retrieve_instance(*args)  # dicomweb-client asks for transfer-syntax=* by default
    assert as_stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    reference = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm").pixel_array
    assert np.array_equal(plain.pixel_array, reference)


def test_wado_metadata_comes_from_the_stored_headers(corpus, server) -> None:
    client = client_for(server)
    metadata = client.retrieve_series_metadata(corpus["study"], corpus["series"])
    assert len(metadata) == 3
    assert {tag(m, "SOPInstanceUID") for m in metadata} == {ds.SOPInstanceUID for ds in corpus["slices"]}
    assert tag(metadata[0], "Rows") == 8
    assert len(client.retrieve_study_metadata(corpus["study"])) == 3
    one = client.retrieve_instance_metadata(corpus["study"], corpus["series"], corpus["slices"][0].SOPInstanceUID)
    assert tag(one, "PatientID") == "P-WEB"
    response = requests.get(
        f"{server.url}/dicom-web/studies/{corpus['study']}/series/{corpus['series']}/metadata",
        auth=("rad", PASSWORD), headers={"Accept-Encoding": "gzip"},
    )
    assert response.headers.get("Content-Encoding") == "gzip"


def test_wado_frames_rendered_and_thumbnails(corpus, server) -> None:
    client = client_for(server)
    first = corpus["slices"][0]
    args = (corpus["study"], corpus["series"], first.SOPInstanceUID)
    frames = client.retrieve_instance_frames(*args, frame_numbers=[1])
    assert np.array_equal(np.frombuffer(frames[0], dtype="<u2").reshape(8, 8), first.pixel_array)
    jpeg = client.retrieve_instance_rendered(*args, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    png = client.retrieve_instance_rendered(*args, media_types=("image/png",), params={"window": "2048,4096,linear"})
    picture = np.asarray(Image.open(io.BytesIO(png)))
    assert picture.shape == (8, 8) and picture[0, 0] < picture[-1, -1]
    frame = client.retrieve_instance_frames_rendered(*args, frame_numbers=[1], media_types=("image/png",))
    assert Image.open(io.BytesIO(frame)).format == "PNG"
    thumbnail = requests.get(f"{server.url}/dicom-web/studies/{corpus['study']}/series/{corpus['series']}/thumbnail",
                             auth=("rad", PASSWORD), headers={"Accept": "image/png"})
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/png"


def test_wado_compressed_frames_in_their_own_media_type(server) -> None:
    result = ingest_file(TEST_FILES / "MR_small_jp2klossless.dcm", Source(channel="test"))
    row = Instance.objects.select_related("series__study").get(pk=result.instance_id)
    args = (row.series.study.study_instance_uid, row.series.series_instance_uid, row.sop_instance_uid)
    client = client_for(server)
    native = client.retrieve_instance_frames(*args, frame_numbers=[1], media_types=(("application/octet-stream", "*"),))
    reference = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm")
    assert np.array_equal(np.frombuffer(native[0], dtype="<i2").reshape(64, 64), reference.pixel_array)
    compressed = client.retrieve_instance_frames(*args, frame_numbers=[1], media_types=(("image/jp2", JPEG2000Lossless),))
    assert compressed[0][:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")  # a JPEG 2000 codestream


def test_wado_uri(corpus, server) -> None:
    first = corpus["slices"][0]
    params = {"requestType": "WADO", "studyUID": corpus["study"], "seriesUID": corpus["series"], "objectUID": first.SOPInstanceUID}
    dicom = requests.get(f"{server.url}/wado", params={**params, "contentType": "application/dicom"}, auth=("rad", PASSWORD))
    assert dicom.status_code == 200 and pydicom.dcmread(io.BytesIO(dicom.content)).SOPInstanceUID == first.SOPInstanceUID
    jpeg = requests.get(f"{server.url}/dicom-web/wado", params=params, auth=("rad", PASSWORD))
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    assert requests.get(f"{server.url}/wado", params={**params, "requestType": "X"}, auth=("rad", PASSWORD)).status_code == 400


# ------------------------------------------------------------------------- STOW-RS


def test_stow_stores_through_the_ingest_service(server) -> None:
    client = client_for(server)
    study_uid = generate_uid()
    datasets = [make_dataset(study_uid=study_uid, accession="STOW") for _ in range(2)]
    answer = client.store_instances(datasets)
    referenced = answer.ReferencedSOPSequence
    assert {item.ReferencedSOPInstanceUID for item in referenced} == {ds.SOPInstanceUID for ds in datasets}
    assert Instance.objects.filter(series__study__study_instance_uid=study_uid).count() == 2
    assert answer.RetrieveURL.endswith(f"/studies/{study_uid}")
    event = AuditEvent.objects.get(action="store", channel="dicomweb")
    assert (event.actor, event.details["stored"]) == ("rad", 2)


def test_stow_reports_failures_with_409(server) -> None:
    client = client_for(server)
    good = make_dataset()
    broken = make_dataset()
    broken.SOPInstanceUID = "not a uid"
    broken.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    with pytest.raises(requests.HTTPError) as failure:
        client.store_instances([good, broken])
    response = failure.value.response
    assert response.status_code == 409
    body = response.json()
    assert len(body["00081199"]["Value"]) == 1  # ReferencedSOPSequence
    failed = body["00081198"]["Value"]  # FailedSOPSequence
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC000]
    assert Instance.objects.filter(sop_instance_uid=good.SOPInstanceUID).exists()


def test_stow_into_a_given_study_refuses_instances_of_another(server) -> None:
    client = client_for(server)
    ds = make_dataset()
    with pytest.raises(requests.HTTPError) as failure:
        client.store_instances([ds], study_instance_uid=generate_uid())
    assert failure.value.response.status_code == 409
    assert not Instance.objects.filter(sop_instance_uid=ds.SOPInstanceUID).exists()


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ('multipart/related; type="application/dicom"; boundary=XX', b"no boundary here", 400),
        ('multipart/related; type="application/dicom"; boundary=XX', b"--XX\r\nContent-Type: application/dicom\r\n\r\nabc", 400),
        ('multipart/related; type="application/dicom"; boundary=XX', b"--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n", 400),
        ("application/json", b"{}", 415),
        ('multipart/related; type="application/dicom"', b"--XX--", 400),
    ],
)
def test_stow_refuses_bad_bodies_and_stores_nothing(server, content_type: str, body: bytes, status: int) -> None:
    response = requests.post(f"{server.url}/dicom-web/studies", data=body, headers={"Content-Type": content_type}, auth=("rad", PASSWORD))
    assert response.status_code == status and response.json()["error"]
    assert Instance.objects.count() == 0


def test_stow_refuses_a_body_over_the_limit(server, settings) -> None:
    settings.PACS_STOW_MAX_BYTES = 2048
    response = requests.post(
        f"{server.url}/dicom-web/studies", data=b"x" * 4096,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'}, auth=("rad", PASSWORD),
    )
    assert response.status_code == 413


def test_a_non_dicom_part_gets_a_failure_not_a_crash(server) -> None:
    body = b"--XX\r\nContent-Type: application/dicom\r\n\r\nthis is not DICOM\r\n--XX--\r\n"
    response = requests.post(f"{server.url}/dicom-web/studies", data=body,
                             headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'}, auth=("rad", PASSWORD))
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert Instance.objects.count() == 0


# ------------------------------------------------------------------------- who may


def test_authentication_by_basic_token_or_session_and_401_otherwise(corpus, server) -> None:
    from rest_framework.authtoken.models import Token

    url = f"{server.url}/dicom-web/studies"
    anonymous = requests.get(url)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]
    assert requests.get(url, auth=("rad", "wrong")).status_code == 401
    token = Token.objects.create(user=make_user("ris", "RIS"))
    assert requests.get(url, headers={"Authorization": f"Token {token.key}"}).status_code == 200
    assert requests.get(url, headers={"Authorization": f"Bearer {token.key}"}).status_code == 200
    # the RIS may search but gets no pixel data
    instance_url = f"{url}/{corpus['study']}/series/{corpus['series']}/instances/{corpus['slices'][0].SOPInstanceUID}"
    assert requests.get(instance_url, headers={"Authorization": f"Token {token.key}"}).status_code == 404
    assert requests.get(instance_url + "/rendered", headers={"Authorization": f"Token {token.key}"}).status_code == 404


def test_a_clinician_sees_only_studies_in_scope(corpus, server) -> None:
    from django.contrib.auth.models import Group

    label = AccessLabel.objects.create(name="Web")
    label.groups.add(Group.objects.get(name="Clinician"))
    Instance.objects.get(sop_instance_uid=corpus["other"].SOPInstanceUID).series.study.access_labels.add(label)
    make_user("clin", "Clinician", password=PASSWORD)
    client = client_for(server, "clin")
    assert [tag(s, "PatientID") for s in client.search_for_studies()] == ["P-DOE"]
    with pytest.raises(requests.HTTPError) as failure:
        client.retrieve_study(corpus["study"])
    assert failure.value.response.status_code == 404
    assert client.retrieve_study_metadata(corpus["other"].StudyInstanceUID)


def test_cors_answers_a_configured_origin(corpus, server, settings) -> None:
    settings.CORS_ALLOWED_ORIGINS = ["https://ohif.example.org"]
    preflight = requests.options(
        f"{server.url}/dicom-web/studies",
        headers={"Origin": "https://ohif.example.org", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.headers.get("Access-Control-Allow-Origin") == "https://ohif.example.org"
    other = requests.options(f"{server.url}/dicom-web/studies", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in other.headers
