"""The audit log: one writer, an append-only table, a hash chain that names the first break,
the events each web access writes, sign-in throttling, and the exports for auditors."""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.test import Client

import audit
from archive.ingest import Source, ingest_bytes
from archive.models import Instance, RemoteNode
from audit.models import AppendOnlyError, AuditEvent
from audit.services import verify_chain
from tests.conftest import make_dataset, make_user, part10, run_together


def events(**filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**filters).order_by("pk"))


def some_events(n: int = 5) -> list[AuditEvent]:
    return [audit.record("query", channel="system", actor=f"tester{i}", details={"i": i}) for i in range(n)]


# ------------------------------------------------------------------------- the chain


def test_each_event_is_chained_to_the_one_before(db) -> None:
    first, second, third = some_events(3)
    assert first.previous_hash == "0" * 64
    assert second.previous_hash == first.hash and third.previous_hash == second.hash
    assert len({first.hash, second.hash, third.hash}) == 3
    assert verify_chain() == (3, None)


def test_verifyaudit_reports_an_intact_chain(db, capsys) -> None:
    some_events(4)
    call_command("verifyaudit")
    assert "4 events verified" in capsys.readouterr().out


def _tamper(sql: str, params: list) -> None:
    """Change the table behind the ORM's back, as someone with database access could."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL session_replication_role = replica")  # a superuser skipping triggers
        cursor.execute(sql, params)


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("UPDATE audit_auditevent SET actor = 'mallory' WHERE id = %s", "was changed after it was written"),
        ("DELETE FROM audit_auditevent WHERE id = %s", "does not follow the event before it"),
    ],
)
def test_verifyaudit_names_the_first_tampered_event(db, sql: str, words: str) -> None:
    victims = some_events(5)
    target = victims[2]
    _tamper(sql, [target.pk])
    with pytest.raises(CommandError) as failure:
        call_command("verifyaudit")
    expected = target.pk if "UPDATE" in sql else victims[3].pk
    assert f"event #{expected} " in str(failure.value) and words in str(failure.value)
    assert "after 2 good events" in str(failure.value)


def test_the_orm_refuses_to_change_or_remove_events(db) -> None:
    event = some_events(1)[0]
    event.actor = "mallory"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(pk=event.pk).update(actor="mallory")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get(pk=event.pk).actor == "tester0"


def test_the_database_refuses_updates_and_deletes_on_postgresql(db) -> None:
    event = some_events(1)[0]
    statements = ["UPDATE audit_auditevent SET actor = 'mallory' WHERE id = %s", "DELETE FROM audit_auditevent WHERE id = %s"]
    for sql in statements:
        if connection.vendor == "postgresql":
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, [event.pk])
        else:
            # SQLite has no such trigger (the ORM guard and the chain protect it): the chain
            # shows the change, which is what this run can check.
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, [event.pk])
            assert verify_chain()[1] is not None
            break
    if connection.vendor == "postgresql":
        assert verify_chain() == (1, None)


def test_the_admin_shows_events_read_only(db) -> None:
    some_events(2)
    admin = make_user("root", "Administrator", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin)
    event = AuditEvent.objects.first()
    assert client.get("/admin/audit/auditevent/").status_code == 200
    assert client.get("/admin/audit/auditevent/?action__exact=query&q=tester1").status_code == 200
    assert client.get(f"/admin/audit/auditevent/{event.pk}/change/").status_code == 200
    assert client.get("/admin/audit/auditevent/add/").status_code == 403
    assert client.post(f"/admin/audit/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk).exists()


@pytest.mark.parametrize("action", ["export_csv", "export_dicom"])
def test_auditors_export_events_as_csv_and_dicom_audit_messages(db, action: str) -> None:
    audit.record("study-view", channel="web", actor="alice", patient_id="P1", study_instance_uid="1.2.3", source_address="10.0.0.9")
    audit.record("login-failed", channel="web", actor="bob", outcome="failure")
    pks = list(AuditEvent.objects.values_list("pk", flat=True))
    admin = make_user("root", "Administrator", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin)  # itself a "login" event, not exported here
    response = client.post("/admin/audit/auditevent/", {"action": action, "_selected_action": pks})
    assert response.status_code == 200
    body = response.content.decode()
    if action == "export_csv":
        lines = body.strip().splitlines()
        assert lines[0].startswith("id,time,actor") and len(lines) == 3
        assert "alice" in body and "1.2.3" in body
    else:
        root = ET.fromstring(response.content)
        messages = root.findall("AuditMessage")
        assert len(messages) == 2
        view = messages[0]
        assert view.find("EventIdentification/EventID").get("csd-code") == "110103"
        assert view.find("EventIdentification").get("EventActionCode") == "R"
        assert view.find("ActiveParticipant").get("UserID") == "alice"
        assert view.find("ActiveParticipant").get("NetworkAccessPointID") == "10.0.0.9"
        objects = {o.get("ParticipantObjectID"): o for o in view.findall("ParticipantObjectIdentification")}
        assert objects["1.2.3"].find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
        assert objects["P1"].get("ParticipantObjectTypeCodeRole") == "1"
        failed = messages[1].find("EventIdentification")
        assert failed.get("EventOutcomeIndicator") == "8"
        assert failed.find("EventTypeCode").get("csd-code") == "110122"
    assert AuditEvent.objects.filter(action="audit-export", actor="root").count() == 1


# ------------------------------------------------------------------------- what each access writes


@pytest.fixture
def study(db) -> Instance:
    result = ingest_bytes(part10(make_dataset(patient_id="P-AUD", accession="AUD")), Source(channel="test"))
    return Instance.objects.select_related("series__study").get(pk=result.instance_id)


def test_sign_in_sign_out_and_failures_are_audited(db) -> None:
    make_user("alice", "Radiologist", password="a long passphrase 1")
    client = Client(REMOTE_ADDR="10.1.2.3", HTTP_USER_AGENT="TestBrowser/1.0")
    client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    client.post("/accounts/login/", {"username": "alice", "password": "a long passphrase 1"})
    client.post("/accounts/logout/")
    recorded = [(e.action, e.actor, e.outcome) for e in events()]
    assert recorded == [("login-failed", "alice", "failure"), ("login", "alice", "success"), ("logout", "alice", "success")]
    login = events(action="login")[0]
    assert (login.source_address, login.user_agent, login.role) == ("10.1.2.3", "TestBrowser/1.0", "Radiologist")


def test_repeated_failures_lock_the_user_out_from_that_address(db, settings) -> None:
    make_user("alice", "Radiologist", password="a long passphrase 1")
    attacker = Client(REMOTE_ADDR="10.6.6.6")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        attacker.post("/accounts/login/", {"username": "alice", "password": "guess"})
    locked = attacker.post("/accounts/login/", {"username": "alice", "password": "a long passphrase 1"})
    assert locked.status_code == 429 and b"Too many failed sign-ins" in locked.content
    assert "_auth_user_id" not in attacker.session
    # the same user from another address is not locked out
    elsewhere = Client(REMOTE_ADDR="10.1.1.1")
    assert elsewhere.post("/accounts/login/", {"username": "alice", "password": "a long passphrase 1"}).status_code == 302
    assert AuditEvent.objects.filter(action="login-failed", actor="alice", details__locked_out=True).exists()


def test_web_accesses_write_one_event_each_and_a_viewer_session_one(study, db) -> None:
    client = Client(REMOTE_ADDR="10.0.0.5")
    client.force_login(make_user("alice", "Radiologist"))
    study_uid = study.series.study.study_instance_uid
    client.get("/", {"name": "doe"})
    client.get(f"/studies/{study_uid}/")
    client.get(f"/viewer/{study_uid}/")
    for _ in range(3):  # the images a viewer loads add nothing
        client.get(f"/render/instances/{study.sop_instance_uid}/frames/1/packed.png")
    recorded = [(e.action, e.study_instance_uid) for e in events()]
    assert recorded == [("login", ""), ("query", ""), ("study-view", study_uid), ("study-view", study_uid)]
    query = events(action="query")[0]
    assert query.details["search"] == {"PatientName": "doe*"} and query.details["matches"] == 1
    assert all(e.patient_id == "P-AUD" for e in events(action="study-view"))


def test_images_fetched_without_their_study_page_are_audited_once(study, db) -> None:
    client = Client()
    client.force_login(make_user("alice", "Radiologist"))
    for kind in ("preview", "packed", "thumbnail"):
        client.get(f"/render/instances/{study.sop_instance_uid}/frames/1/{kind}.png")
    assert [(e.action, e.patient_id) for e in events()] == [("login", ""), ("retrieve", "P-AUD")]


def test_a_change_to_a_dicom_node_in_admin_is_audited(db) -> None:
    admin = make_user("root", "Administrator", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin)
    response = client.post(
        "/admin/archive/remotenode/add/",
        {"name": "ws", "ae_title": "WS1", "host": "10.0.0.7", "port": "104", "may_store": "on", "may_query": "on"},
    )
    assert response.status_code == 302, response.content[:500]
    assert RemoteNode.objects.filter(ae_title="WS1").exists()
    event = events(action="node-change")[0]
    assert (event.actor, event.channel, event.details["change"]) == ("root", "admin", "added")


def test_a_change_of_a_users_groups_is_audited(db) -> None:
    admin = make_user("root", "Administrator", is_staff=True, is_superuser=True)
    bob = make_user("bob", "Clinician")
    client = Client()
    client.force_login(admin)
    from django.contrib.auth.models import Group

    response = client.post(
        f"/admin/auth/user/{bob.pk}/change/",
        {"username": "bob", "groups": [Group.objects.get(name="Radiologist").pk], "is_active": "on",
         "date_joined_0": "2024-01-01", "date_joined_1": "00:00:00"},
    )
    assert response.status_code == 302, response.content[:800]
    assert list(User.objects.get(pk=bob.pk).groups.values_list("name", flat=True)) == ["Radiologist"]
    assert events(action="permission-change")[0].details["object"] == "auth.user"


def test_an_idle_session_expires(db, settings) -> None:
    client = Client()
    client.force_login(make_user("alice", "Radiologist"))
    assert client.get("/").status_code == 200
    assert client.session.get_expiry_age() <= settings.PACS_SESSION_IDLE_MINUTES * 60
    session = client.session
    session.set_expiry(-1)  # as if the idle time had passed
    session.save()
    assert client.get("/").status_code == 302


def test_concurrent_writers_keep_one_unbroken_chain(transactional_db) -> None:
    from django.db import connection as thread_connection

    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(20):
                audit.record("query", channel="system", actor=f"writer{n}", details={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            thread_connection.close()

    run_together([functools.partial(writer, n) for n in range(4)], timeout=120)
    assert errors == []
    assert verify_chain() == (80, None)
