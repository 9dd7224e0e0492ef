"""The portal's pages through Django's test client: sign-in, study list, study page, images."""

from __future__ import annotations

import datetime as dt
import io
import random

import pytest
from django.test import Client
from django.utils import timezone
from PIL import Image
from pydicom.uid import generate_uid

from archive.ingest import Source, ingest_bytes
from archive.models import Instance, Study
from tests.conftest import make_dataset, make_user, part10


def store(**kwargs) -> Instance:
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k[0].isupper()}
    ds = make_dataset(**kwargs)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    result = ingest_bytes(part10(ds), Source(channel="test"))
    assert result.ok, result.reason
    return Instance.objects.select_related("series__study").get(pk=result.instance_id)


@pytest.fixture
def alice(db) -> Client:
    client = Client()
    client.force_login(make_user("alice", "Radiologist"))
    return client


@pytest.fixture
def archive(db) -> dict[str, Study]:
    today = timezone.localdate()
    studies = {}
    for key, values in {
        "muller": dict(patient_name="Müller^Hans", patient_id="P-MUL", accession="ACC-MUL", study_date=today.strftime("%Y%m%d"), modality="CT", StudyDescription="CT chest with contrast"),
        "doe": dict(patient_name="Doe^Jane", patient_id="P-DOE", accession="ACC-DOE", study_date=(today - dt.timedelta(days=1)).strftime("%Y%m%d"), modality="MR", StudyDescription="MR brain"),
        "doe_prior": dict(patient_name="Doe^Jane", patient_id="P-DOE", accession="ACC-DOE0", study_date="20200101", modality="CR", StudyDescription="Chest X-ray"),
        "smith": dict(patient_name="Smith^John", patient_id="P-SMI", accession="ACC-SMI", study_date=(today - dt.timedelta(days=20)).strftime("%Y%m%d"), modality="US", StudyDescription="Abdomen"),
    }.items():
        instance = store(**values)
        studies[key] = instance.series.study
    return studies


def listed(response) -> list[str]:
    """Accession numbers of the studies a study list page shows, in order."""
    rows = response.context["studies"]
    return [study.accession_number for study in rows]


# ------------------------------------------------------------------------ sign-in


@pytest.mark.parametrize("url", ["/", "/studies/1.2.3/", "/viewer/1.2.3/", "/render/series/1.2.3/thumbnail.png", "/accounts/password_change/"])
def test_every_page_but_login_requires_a_user(db, url: str) -> None:
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_it_signs_in_and_out(db) -> None:
    make_user("alice", "Radiologist", password="a long passphrase 1")
    client = Client()
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 200 and b"did not match" in response.content
    response = client.post("/accounts/login/", {"username": "alice", "password": "a long passphrase 1"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.post("/accounts/logout/").status_code == 200
    assert client.get("/").status_code == 302


def test_every_page_names_its_icon(db) -> None:
    """Browsers ask for an icon; the pages name one that is there (else /favicon.ico, a 404)."""
    from django.contrib.staticfiles import finders

    page = Client().get("/accounts/login/").content.decode()
    assert 'rel="icon"' in page and "viewer/favicon" in page
    assert finders.find("viewer/favicon.svg")


def test_it_changes_the_password(db) -> None:
    user = make_user("alice", "Radiologist", password="a long passphrase 1")
    client = Client()
    client.force_login(user)
    response = client.post(
        "/accounts/password_change/",
        {"old_password": "a long passphrase 1", "new_password1": "another passphrase 2", "new_password2": "another passphrase 2"},
    )
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password("another passphrase 2")


# ------------------------------------------------------------------------ study list


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["ACC-MUL", "ACC-DOE", "ACC-SMI", "ACC-DOE0"]),  # newest first
        ({"name": "muller"}, ["ACC-MUL"]),  # accent- and case-insensitive
        ({"name": "MÜLL"}, ["ACC-MUL"]),
        ({"name": "doe jane"}, ["ACC-DOE", "ACC-DOE0"]),
        ({"name": "Doe, J"}, ["ACC-DOE", "ACC-DOE0"]),
        ({"name": "*ith"}, ["ACC-SMI"]),
        ({"name": "s?ith^john"}, ["ACC-SMI"]),
        ({"patient_id": "P-DOE"}, ["ACC-DOE", "ACC-DOE0"]),
        ({"accession": "ACC-DOE0"}, ["ACC-DOE0"]),
        ({"range": "today"}, ["ACC-MUL"]),
        ({"range": "yesterday"}, ["ACC-DOE"]),
        ({"range": "7d"}, ["ACC-MUL", "ACC-DOE"]),
        ({"range": "30d"}, ["ACC-MUL", "ACC-DOE", "ACC-SMI"]),
        ({"date_from": "2019-01-01", "date_to": "2020-12-31"}, ["ACC-DOE0"]),
        ({"date_to": "2020-12-31"}, ["ACC-DOE0"]),
        ({"modality": "mr"}, ["ACC-DOE"]),
        ({"q": "chest"}, ["ACC-MUL", "ACC-DOE0"]),  # free text, any case, anywhere in the description
        ({"q": "CR series"}, ["ACC-DOE0"]),  # series descriptions count too
        ({"sort": "accession"}, ["ACC-DOE", "ACC-DOE0", "ACC-MUL", "ACC-SMI"]),
        ({"sort": "-name"}, ["ACC-SMI", "ACC-MUL", "ACC-DOE", "ACC-DOE0"]),
        ({"sort": "date"}, ["ACC-DOE0", "ACC-SMI", "ACC-DOE", "ACC-MUL"]),
        ({"name": "nobody"}, []),
    ],
)
def test_it_searches_studies(alice: Client, archive, params: dict, expected: list[str]) -> None:
    response = alice.get("/", params)
    assert response.status_code == 200
    assert listed(response) == expected


def test_it_shows_what_a_reader_needs_in_each_row(alice: Client, archive) -> None:
    content = alice.get("/", {"name": "muller"}).content.decode()
    for text in ("MÜLLER, Hans", "P-MUL", "1970-01-01", "CT", "CT chest with contrast", "ACC-MUL", f'/studies/{archive["muller"].study_instance_uid}/'):
        assert text in content


@pytest.mark.parametrize(
    "params",
    [{"date_from": "31/01/2024"}, {"modality": "C'T"}, {"name": "x" * 5000}, {"sort": "nonsense;drop"}, {"page": "-1"}, {"page": "zz"}],
)
def test_it_answers_bad_input_with_a_message_not_an_error(alice: Client, archive, params: dict) -> None:
    response = alice.get("/", params)
    assert response.status_code in (200, 400)


def test_it_reports_a_bad_date_as_a_400_with_a_message(alice: Client, archive) -> None:
    response = alice.get("/", {"date_from": "31/01/2024"})
    assert response.status_code == 400
    assert b"Use a date such as" in response.content


def test_it_pages_on_the_server(alice: Client, db) -> None:
    for n in range(55):
        store(accession=f"A{n:03d}", patient_id=f"P{n}", study_date="20240101")
    first = alice.get("/", {"sort": "accession"})
    second = alice.get("/", {"sort": "accession", "page": 2})
    assert listed(first) == [f"A{n:03d}" for n in range(50)]
    assert listed(second) == [f"A{n:03d}" for n in range(50, 55)]
    assert b"page 1 of 2" in first.content
    assert b"sort=accession" in first.content and b"page=2" in first.content


# ------------------------------------------------------------------------ study page


def test_the_study_page_shows_series_with_thumbnails_and_links_to_priors(alice: Client, archive) -> None:
    study = archive["doe"]
    content = alice.get(f"/studies/{study.study_instance_uid}/").content.decode()
    series = study.series.get()
    assert "DOE, Jane" in content and "P-DOE" in content and "MR brain" in content
    assert f"/viewer/{study.study_instance_uid}/?series={series.series_instance_uid}" in content
    assert f"/render/series/{series.series_instance_uid}/thumbnail.png" in content
    assert f'/studies/{archive["doe_prior"].study_instance_uid}/' in content  # the prior, one click away
    assert archive["muller"].study_instance_uid not in content


def test_an_unknown_study_is_a_404(alice: Client, db) -> None:
    assert alice.get("/studies/1.2.3.4/").status_code == 404
    assert alice.get("/viewer/1.2.3.4/").status_code == 404
    assert alice.get("/studies/not-a-uid/").status_code == 404


# ------------------------------------------------------------------------ viewer and images


def test_the_viewer_orders_slices_along_the_slice_normal(alice: Client, db) -> None:
    series_uid, study_uid = generate_uid(), generate_uid()
    # sagittal slices numbered against their position; the normal (row x column) is -x
    positions = [5.0, -2.5, 0.0, 10.0, 7.5]
    random.Random(1).shuffle(positions)
    for number, x in enumerate(positions, start=1):
        store(
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=number,
            ImagePositionPatient=[x, -100.0, 50.0],
            ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
        )
    response = alice.get(f"/viewer/{study_uid}/")
    assert response.status_code == 200
    slices = response.context["viewer_data"]["slices"]
    assert [s["position"][0] for s in slices] == sorted(positions, reverse=True)
    answer = alice.get(f"/studies/{study_uid}/series/{series_uid}/slices.json").json()
    assert [s["position"][0] for s in answer["slices"]] == sorted(positions, reverse=True)


def test_without_positions_slices_follow_the_instance_number(alice: Client, db) -> None:
    series_uid, study_uid = generate_uid(), generate_uid()
    for number in (3, 1, 2):
        instance = store(series_uid=series_uid, study_uid=study_uid, instance_number=number)
        metadata = instance.metadata
        metadata.pop("00200032", None)
        Instance.objects.filter(pk=instance.pk).update(metadata=metadata)
    slices = alice.get(f"/viewer/{study_uid}/").context["viewer_data"]["slices"]
    assert [s["instance_number"] for s in slices] == [1, 2, 3]


def test_images_are_png_with_validators_and_immutable_caching(alice: Client, db) -> None:
    instance = store()
    url = f"/render/instances/{instance.sop_instance_uid}/frames/1/packed.png"
    response = alice.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    assert "immutable" in response["Cache-Control"] and "private" in response["Cache-Control"]
    picture = Image.open(io.BytesIO(b"".join(response.streaming_content)))
    assert picture.mode == "RGB" and picture.size == (16, 16)
    again = alice.get(url, headers={"If-None-Match": response["ETag"]})
    assert again.status_code == 304
    thumbnail = alice.get(f"/render/series/{instance.series.series_instance_uid}/thumbnail.png")
    assert thumbnail.status_code == 200 and thumbnail["Cache-Control"] == "private, no-cache"


@pytest.mark.parametrize("suffix", ["frames/2/preview.png", "frames/0/preview.png", "frames/1/jpeg.png"])
def test_a_frame_or_rendition_that_does_not_exist_is_a_404(alice: Client, db, suffix: str) -> None:
    instance = store()
    assert alice.get(f"/render/instances/{instance.sop_instance_uid}/{suffix}").status_code == 404


def test_an_image_that_cannot_be_rendered_says_why(alice: Client, db, storage_dir) -> None:
    instance = store()
    (storage_dir / instance.file_path).write_bytes(b"DICM damaged")
    response = alice.get(f"/render/instances/{instance.sop_instance_uid}/frames/1/preview.png")
    assert response.status_code == 422
    assert response.json()["error"]
