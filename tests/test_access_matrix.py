"""Who may reach what, on every channel: the access matrix.

Web: every URL the resolver knows (outside Django's own admin and sign-in pages) is found
here by itself, so a new view without a check fails this test until it is added to the
table. Each is requested by every role, for a study in the user's scope and one out of it.
DIMSE: C-FIND, C-MOVE, C-GET and C-STORE for nodes with and without each right, and for a
node limited to one access label.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pydicom.uid import ExplicitVRLittleEndian

from archive.dimse import status
from archive.ingest import Source, ingest_bytes
from archive.models import AccessLabel, Instance, RemoteNode, SendJob, Study
from audit.models import AuditEvent
from tests.conftest import free_port, make_dataset, make_user, part10

# Django's own pages: admin checks staff and model permissions itself; sign-in is public.
OWN_PREFIXES = ("admin/", "accounts/")
# Path parameters of the portal's URLs: how to fill each from a study's objects.
PARAMETERS = {
    "study_uid": lambda objects: objects["study"].study_instance_uid,
    "series_uid": lambda objects: objects["series"].series_instance_uid,
    "sop_uid": lambda objects: objects["instance"].sop_instance_uid,
    "study": lambda objects: objects["study"].study_instance_uid,
    "series": lambda objects: objects["series"].series_instance_uid,
    "instance": lambda objects: objects["instance"].sop_instance_uid,
    "frame": lambda objects: 1,
    "frames": lambda objects: "1",
    "kind": lambda objects: "preview",
    "tag": lambda objects: "00100010",
    "study_instance_uid": lambda objects: objects["study"].study_instance_uid,
    "series_instance_uid": lambda objects: objects["series"].series_instance_uid,
    "sop_instance_uid": lambda objects: objects["instance"].sop_instance_uid,
}
API_ADMIN = {"label-list", "label-detail", "node-list", "node-detail"}
API_POST_ONLY = {"study-labels", "study-send", "series-send"}
# DICOMweb searches answer 204 when nothing in scope matches; the rest is 404 out of scope.
QIDO = {"studies", "series", "instances", "study-series", "study-instances", "series-instances"}
METADATA = {"study-metadata", "series-metadata", "instance-metadata"}
ROLES = ["anonymous", "no role", "RIS", "Clinician", "Technologist", "Radiologist", "Administrator"]
SCOPED = {"Clinician", "Technologist"}  # see only their labels' studies


def portal_urls() -> list[tuple[str, str]]:
    """(route, name) of every URL pattern outside Django's own apps."""
    found: list[tuple[str, str]] = []

    def walk(patterns, prefix: str, namespace: str) -> None:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if route.startswith(OWN_PREFIXES):
                continue
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route, pattern.namespace or namespace)
            elif isinstance(pattern, URLPattern):
                found.append((route, f"{namespace}:{pattern.name}" if namespace else str(pattern.name)))

    walk(get_resolver().url_patterns, "", "")
    return [(route, name) for route, name in found if "format" not in route]  # DRF's ".json" aliases


def fill(route: str, objects: dict) -> str:
    """A concrete URL for a route (Django path syntax or a DRF router regex) and a study's objects."""
    import re

    def value(name: str) -> str:
        if name == "pk":  # DRF routes by primary key: which model depends on the route
            owner = next(k for k in ("patients", "labels", "nodes", "sends") if f"{k}/" in route)
            return str({"patients": objects["study"].patient_id, "labels": objects["label"].pk,
                        "nodes": objects["node"].pk, "sends": objects["job"].pk}[owner])
        if name not in PARAMETERS:
            pytest.fail(f"URL {route} has a parameter {name!r} this matrix does not know: add it to PARAMETERS")
        return str(PARAMETERS[name](objects))

    url = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: value(m.group(1)), route)
    url = re.sub(r"<(?:(\w+):)?(\w+)>", lambda m: value(m.group(2)), url)
    return "/" + url.replace("^", "").replace("$", "")


def store_study(**kwargs) -> dict:
    result = ingest_bytes(part10(make_dataset(**kwargs)), Source(channel="test", ae_title="MODALITY"))
    assert result.ok, result.reason
    instance = Instance.objects.select_related("series__study").get(pk=result.instance_id)
    return {"instance": instance, "series": instance.series, "study": instance.series.study}


def two_studies() -> tuple[AccessLabel, dict, dict]:
    """A "Cardiology" label, a study carrying it (IN) and one without it (OUT)."""
    cardiology = AccessLabel.objects.create(name="Cardiology")
    inside = store_study(patient_id="P-IN", accession="IN")
    outside = store_study(patient_id="P-OUT", accession="OUT")
    inside["study"].access_labels.add(cardiology)
    return cardiology, inside, outside


@pytest.fixture
def world(db):
    cardiology, inside, outside = two_studies()
    node = RemoteNode.objects.create(name="ws", ae_title="WS", host="127.0.0.1", port=104)
    for objects in (inside, outside):
        objects["label"], objects["node"] = cardiology, node
        objects["job"] = SendJob.objects.create(node=node, study=objects["study"])
    clients: dict[str, Client] = {"anonymous": Client()}
    for role in ROLES[1:]:
        user = make_user(role.lower().replace(" ", ""), *([] if role == "no role" else [role]))
        client = Client()
        client.force_login(user)
        clients[role] = client
    for group_name in SCOPED:
        cardiology.groups.add(_group(group_name))
    return {"in": inside, "out": outside, "clients": clients, "label": cardiology}


def _group(name: str):
    from django.contrib.auth.models import Group

    return Group.objects.get(name=name)


def sees(role: str, scope: str) -> bool:
    """Whether the role sees the study's information (search, metadata)."""
    return role in ("RIS", "Radiologist", "Administrator") or (role in SCOPED and scope == "in")


def sees_images(role: str, scope: str) -> bool:
    return role != "RIS" and sees(role, scope)


def expected_status(role: str, scope: str, has_parameters: bool, name: str) -> int:
    if name.startswith("api:"):
        short = name.split(":")[-1]
        if short in ("schema", "docs"):
            return 200  # the schema holds no patient data
        if role == "anonymous":
            return 401
        if short in API_ADMIN:
            return 200 if role == "Administrator" else 403
        if short in API_POST_ONLY:
            return 405
        if short == "send-detail":
            return 404  # a send is seen by whoever asked for it (and staff)
        if short.endswith("-list") or short == "api-root":
            return 200
        if short == "instance-file":
            if not sees(role, scope):
                return 404
            return 200 if role in ("Radiologist", "Administrator") else 403
        return 200 if sees(role, scope) else 404
    if name.startswith("dicomweb:") or name == "wado-uri":
        short = name.split(":")[-1]
        if role == "anonymous":
            return 401
        if short == "wado-uri":
            return 400  # asked without its parameters
        if short in QIDO:
            if not has_parameters:
                return 200 if role in ("RIS", "Clinician", "Technologist", "Radiologist", "Administrator") else 204
            return 200 if sees(role, scope) else 204
        if short in METADATA:
            return 200 if sees(role, scope) else 404
        return 200 if sees_images(role, scope) else 404
    if role == "anonymous":
        return 302
    if role in ("no role", "RIS"):
        return 403
    if has_parameters and scope == "out" and role in SCOPED:
        return 404
    return 200


def test_the_matrix_finds_the_portal_urls() -> None:
    names = {name for _, name in portal_urls()}
    assert {"viewer:study-list", "viewer:study-detail", "viewer:viewer", "viewer:frame-image"} <= names
    assert {"dicomweb:studies", "dicomweb:frames", "dicomweb:series-metadata", "wado-uri"} <= names


@pytest.mark.parametrize("role", ROLES)
def test_every_portal_url_for_every_role_in_and_out_of_scope(world, role: str) -> None:
    client = world["clients"][role]
    failures = []
    for route, name in portal_urls():
        has_parameters = "<" in route
        for scope in ("in", "out") if has_parameters else ("in",):
            url = fill(route, world[scope])
            response = client.get(url)
            expected = expected_status(role, scope, has_parameters, name)
            if response.status_code != expected:
                failures.append(f"{role} {scope}-of-scope {name} {url}: {response.status_code}, expected {expected}")
            if expected == 302:
                assert response["Location"].startswith("/accounts/login/")
    assert failures == []


@pytest.mark.parametrize(("role", "visible"), [("Clinician", {"IN"}), ("Radiologist", {"IN", "OUT"}), ("Administrator", {"IN", "OUT"})])
def test_search_answers_hold_only_studies_in_scope(world, role: str, visible: set[str]) -> None:
    response = world["clients"][role].get("/")
    assert {s.accession_number for s in response.context["studies"]} == visible


def test_referring_physicians_see_their_own_patients_when_switched_on(world, settings) -> None:
    doctor = make_user("house", "Clinician", first_name="Gregory", last_name="House")
    client = Client()
    client.force_login(doctor)
    theirs = store_study(patient_id="P-REF", accession="REF")
    Study.objects.filter(pk=theirs["study"].pk).update(referring_physician_name="HOUSE^GREGORY")
    assert client.get(f"/studies/{theirs['study'].study_instance_uid}/").status_code == 404
    settings.PACS_REFERRING_PHYSICIAN_SCOPE = True
    assert client.get(f"/studies/{theirs['study'].study_instance_uid}/").status_code == 200
    assert client.get(f"/studies/{world['out']['study'].study_instance_uid}/").status_code == 404


def test_label_rules_label_arriving_studies(db) -> None:
    from archive.models import LabelRule

    north = AccessLabel.objects.create(name="Site North")
    LabelRule.objects.create(label=north, attribute="calling_ae", pattern="CT_NORTH*")
    cardio = AccessLabel.objects.create(name="Cardiology")
    LabelRule.objects.create(label=cardio, attribute="institution_name", pattern="*heart*")
    ds = make_dataset()
    ds.InstitutionName = "City Heart Centre"
    result = ingest_bytes(part10(ds), Source(channel="test", ae_title="CT_NORTH_2"))
    study = Instance.objects.get(pk=result.instance_id).series.study
    assert set(study.access_labels.values_list("name", flat=True)) == {"Site North", "Cardiology"}
    other = ingest_bytes(part10(make_dataset()), Source(channel="test", ae_title="MR_SOUTH"))
    assert not Instance.objects.get(pk=other.instance_id).series.study.access_labels.exists()


# ------------------------------------------------------------------------- DIMSE


def associate(scp, calling: str, *contexts, **kwargs):
    ae = AE(ae_title=calling)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSPORTAL", **kwargs)
    assert assoc.is_established
    return assoc


def find_studies(scp, calling: str) -> tuple[set[str], int]:
    assoc = associate(scp, calling, StudyRootQueryRetrieveInformationModelFind)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.AccessionNumber = ""
    found, final = set(), None
    for reply, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if reply.Status == status.PENDING:
            found.add(str(answer.AccessionNumber))
        else:
            final = reply.Status
    assoc.release()
    return found, final


def get_study(scp, calling: str, study_uid: str) -> tuple[int, int]:
    received = []
    assoc = associate(
        scp, calling, StudyRootQueryRetrieveInformationModelGet, (CTImageStorage, [ExplicitVRLittleEndian]),
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event.request) or 0x0000)],
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    replies = [reply for reply, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    return replies[-1].Status, len(received)


def move_study(scp, calling: str, study_uid: str, destination: str) -> int:
    assoc = associate(scp, calling, StudyRootQueryRetrieveInformationModelMove)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    replies = [reply for reply, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    return replies[-1].Status


def store_one(scp, calling: str) -> int:
    assoc = associate(scp, calling, (CTImageStorage, [ExplicitVRLittleEndian]))
    reply = assoc.send_c_store(make_dataset(modality="CT"))
    assoc.release()
    return reply.Status


@pytest.fixture
def dimse_world(scp):
    cardiology, inside, outside = two_studies()
    port = free_port()  # nobody listens: a move's sub-operations fail, its authorization does not
    RemoteNode.objects.create(name="full", ae_title="FULL", host="127.0.0.1", port=port)
    RemoteNode.objects.create(name="no rights", ae_title="NORIGHTS", host="127.0.0.1", port=port,
                              may_store=False, may_query=False, may_retrieve=False)
    scoped = RemoteNode.objects.create(name="cardiology ws", ae_title="CARDIO", host="127.0.0.1", port=port)
    scoped.access_labels.add(cardiology)
    return {"scp": scp, "in": inside, "out": outside}


def test_c_find_follows_the_nodes_rights_and_scope(dimse_world) -> None:
    scp = dimse_world["scp"]
    assert find_studies(scp, "FULL") == ({"IN", "OUT"}, status.SUCCESS)
    assert find_studies(scp, "UNKNOWN") == ({"IN", "OUT"}, status.SUCCESS)  # PACS_QR_KNOWN_NODES_ONLY is off
    assert find_studies(scp, "NORIGHTS") == (set(), status.NOT_AUTHORIZED)
    assert find_studies(scp, "CARDIO") == ({"IN"}, status.SUCCESS)
    scp.audit.flush()  # the SCP writes its audit events in a thread of its own
    denied = AuditEvent.objects.filter(action="query", outcome="denied", actor="NORIGHTS")
    assert denied.count() == 1 and denied.get().channel == "dimse"
    assert AuditEvent.objects.filter(action="query", outcome="success", actor="CARDIO").get().details["answers"] == 1


def test_c_get_follows_the_nodes_rights_and_scope(dimse_world) -> None:
    scp, inside, outside = dimse_world["scp"], dimse_world["in"], dimse_world["out"]
    assert get_study(scp, "FULL", outside["study"].study_instance_uid) == (status.SUCCESS, 1)
    assert get_study(scp, "NORIGHTS", inside["study"].study_instance_uid) == (status.NOT_AUTHORIZED, 0)
    assert get_study(scp, "CARDIO", inside["study"].study_instance_uid) == (status.SUCCESS, 1)
    assert get_study(scp, "CARDIO", outside["study"].study_instance_uid) == (status.SUCCESS, 0)  # out of scope: no match
    scp.audit.flush()
    event = AuditEvent.objects.filter(action="retrieve", actor="FULL").get()
    assert event.study_instance_uid == outside["study"].study_instance_uid and event.details["instances"] == 1


def test_c_move_refuses_a_node_without_the_right(dimse_world) -> None:
    scp, inside = dimse_world["scp"], dimse_world["in"]
    assert move_study(scp, "NORIGHTS", inside["study"].study_instance_uid, "FULL") == status.NOT_AUTHORIZED
    assert move_study(scp, "FULL", inside["study"].study_instance_uid, "NORIGHTS") == status.MOVE_DESTINATION_UNKNOWN
    scp.audit.flush()
    assert AuditEvent.objects.filter(action="retrieve", actor="NORIGHTS", outcome="denied").count() == 1


def test_c_store_refuses_a_node_without_the_right_and_audits_the_stores(dimse_world) -> None:
    scp = dimse_world["scp"]
    assert store_one(scp, "NORIGHTS") == status.NOT_AUTHORIZED
    assert store_one(scp, "FULL") == status.SUCCESS
    assert store_one(scp, "NEWMODALITY") == status.SUCCESS  # an undeclared sender may store
    assert Instance.objects.count() == 4
    # the events of an association are written when it ends (in the SCP's thread)
    import time

    for _ in range(50):
        if AuditEvent.objects.filter(action="store").count() >= 3:
            break
        time.sleep(0.1)
    stores = AuditEvent.objects.filter(action="store")
    assert {(e.actor, e.outcome) for e in stores} == {("NORIGHTS", "denied"), ("FULL", "success"), ("NEWMODALITY", "success")}
    assert all(e.study_instance_uid for e in stores.filter(outcome="success"))
