"""Django admin: the archive is searchable, filterable and read-only there."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client

from archive.ingest import Source, ingest_dataset
from archive.models import Instance, Patient, Series, Study
from tests.conftest import make_dataset


@pytest.fixture
def admin_client_with_data(db) -> Client:
    for name, pid, modality, accession in (
        ("Müller^Jürgen", "PID-1", "CT", "ACC-1"),
        ("山田^太郎", "PID-2", "MR", "ACC-2"),
    ):
        ds = make_dataset(patient_name=name, patient_id=pid, modality=modality, accession=accession, charset="ISO_IR 192")
        assert ingest_dataset(ds, Source(channel="import")).ok
    user = User.objects.create_superuser("alice", "alice@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    "url, present, absent",
    [
        ("/admin/archive/study/?q=muller", "ACC-1", "ACC-2"),  # accent-folded name search
        ("/admin/archive/study/?q=PID-2", "ACC-2", "ACC-1"),
        ("/admin/archive/study/?q=ACC-1", "ACC-1", "ACC-2"),
        ("/admin/archive/study/?modality=MR", "ACC-2", "ACC-1"),
        ("/admin/archive/patient/?q=山田", "PID-2", "PID-1"),
    ],
)
def test_it_searches_and_filters_studies(admin_client_with_data: Client, url: str, present: str, absent: str) -> None:
    response = admin_client_with_data.get(url)
    assert response.status_code == 200
    body = response.content.decode()
    assert present in body
    assert absent not in body


def test_every_archive_page_renders_read_only(admin_client_with_data: Client) -> None:
    client = admin_client_with_data
    for model in (Patient, Study, Series, Instance):
        name = model._meta.model_name
        assert client.get(f"/admin/archive/{name}/").status_code == 200
        obj = model.objects.first()
        page = client.get(f"/admin/archive/{name}/{obj.pk}/change/")
        assert page.status_code == 200
        if model is not Study:  # a study's access labels are set by hand; nothing else is
            assert 'type="submit" value="Save"' not in page.content.decode()
        assert client.get(f"/admin/archive/{name}/add/").status_code == 403
        assert client.post(f"/admin/archive/{name}/{obj.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Instance.objects.count() == 2
    instance = Instance.objects.first()
    page = client.get(f"/admin/archive/instance/{instance.pk}/change/").content.decode()
    assert "00080018" in page  # the DICOM JSON header is shown


def test_only_a_studys_access_labels_are_edited_by_hand(admin_client_with_data: Client) -> None:
    from archive.models import AccessLabel

    study = Study.objects.first()
    label = AccessLabel.objects.create(name="Cardiology")
    before = (study.study_description, study.accession_number)
    response = admin_client_with_data.post(
        f"/admin/archive/study/{study.pk}/change/",
        {"access_labels": [label.pk], "study_description": "changed", "accession_number": "X",
         "series-TOTAL_FORMS": "0", "series-INITIAL_FORMS": "0"},
    )
    assert response.status_code == 302
    study.refresh_from_db()
    assert list(study.access_labels.all()) == [label]
    assert (study.study_description, study.accession_number) == before


def test_the_admin_requires_a_staff_login(db) -> None:
    response = Client().get("/admin/archive/study/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]  # every page but login requires a user
    clinician = Client()
    clinician.force_login(User.objects.create_user("bob", password="x"))  # signed in, not staff
    response = clinician.get("/admin/archive/study/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
