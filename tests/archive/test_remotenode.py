"""Remote DICOM nodes: the model's checks, ``remotenode`` add/list/remove/echo, C-ECHO as an
SCU (archive.dimse.echo.verify) over real sockets, and the admin's "Verify with C-ECHO"."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import constants as message_levels
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from archive.dimse.echo import verify
from archive.dimse.server import Scp
from archive.models import RemoteNode, validate_ae_title
from tests.conftest import free_port


def add(*args: str) -> None:
    call_command("remotenode", "add", *args)


# The model


@pytest.mark.parametrize(
    "ae_title, valid",
    [
        ("CT01", True),
        ("A", True),
        ("SIXTEEN_CHARS_OK", True),
        ("with space", True),
        ("", False),
        ("   ", False),
        ("SEVENTEEN_CHARS_X", False),
        ("BACK\\SLASH", False),
        ("TAB\tBED", False),
        ("NEW\nLINE", False),
        ("ÄRZTE", False),
    ],
)
def test_it_validates_ae_titles(ae_title: str, valid: bool) -> None:
    if valid:
        validate_ae_title(ae_title)
    else:
        with pytest.raises(ValidationError):
            validate_ae_title(ae_title)


@pytest.mark.django_db
def test_it_strips_the_ae_title_and_names_itself() -> None:
    node = RemoteNode(name="CT scanner", ae_title=" CT01 ", host="10.0.0.5", port=104)
    node.full_clean()
    node.save()
    assert node.ae_title == "CT01"
    assert str(node) == "CT scanner (CT01@10.0.0.5:104)"
    assert node.rights == ["store", "query", "retrieve"]


# The command


@pytest.mark.django_db
def test_it_adds_lists_and_removes_nodes(capsys) -> None:
    add("CT scanner", "CT01", "10.0.0.5", "104", "--no-query", "--description", "room 2")
    add("Workstation", "OSIRIX", "ws.example.org", "11112", "--no-store", "--no-query", "--no-retrieve")
    add("Archive B", "ARCHIVE_B", "pacs-b", "11112")
    assert "added CT scanner (CT01@10.0.0.5:104)" in capsys.readouterr().out

    ct = RemoteNode.objects.get(name="CT scanner")
    assert (ct.ae_title, ct.host, ct.port, ct.description) == ("CT01", "10.0.0.5", 104, "room 2")
    assert (ct.may_store, ct.may_query, ct.may_retrieve) == (True, False, True)

    call_command("remotenode", "list")
    assert capsys.readouterr().out.splitlines() == [
        "NAME         AE TITLE   ADDRESS               MAY",
        "Archive B    ARCHIVE_B  pacs-b:11112          store,query,retrieve",
        "CT scanner   CT01       10.0.0.5:104          store,retrieve",
        "Workstation  OSIRIX     ws.example.org:11112  -",
    ]

    call_command("remotenode", "remove", "Workstation")
    assert "removed Workstation" in capsys.readouterr().out
    call_command("remotenode", "remove", "CT scanner")
    call_command("remotenode", "remove", "Archive B")
    assert RemoteNode.objects.count() == 0
    capsys.readouterr()
    call_command("remotenode", "list")
    assert capsys.readouterr().out == "no remote nodes\n"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (["CT scanner", "OTHER", "h", "104"], "A remote node with this name already exists"),
        (["Other", "CT01", "h", "104"], "A remote node with this AE title already exists"),
        (["Other", "", "h", "104"], "AE title: This field cannot be blank"),
        (["Other", "    ", "h", "104"], "AE title: An AE title must not be empty"),
        (["Other", "A\\B", "h", "104"], "must not contain a backslash"),
        (["Other", "SEVENTEEN_CHARS_X", "h", "104"], "at most 16 characters"),
        (["Other", "BELL\x07", "h", "104"], "printable ASCII"),
        (["Other", "OTHER", "h", "0"], "port: Ensure this value is greater than or equal to 1"),
        (["Other", "OTHER", "h", "65536"], "port: Ensure this value is less than or equal to 65535"),
        (["Other", "OTHER", "h", "eleven"], "the port must be a number"),
        (["Other", "OTHER", "", "104"], "host: This field cannot be blank"),
        (["", "OTHER", "h", "104"], "name: This field cannot be blank"),
    ],
)
def test_it_refuses_duplicates_and_bad_values(args: list[str], message: str) -> None:
    add("CT scanner", "CT01", "10.0.0.5", "104")
    with pytest.raises(CommandError, match=message.replace("\\", "\\\\")):
        add(*args)
    assert list(RemoteNode.objects.values_list("name", flat=True)) == ["CT scanner"]


@pytest.mark.django_db
def test_it_refuses_to_remove_an_unknown_node() -> None:
    add("CT scanner", "CT01", "10.0.0.5", "104")
    with pytest.raises(CommandError, match="no remote node named 'CT'"):
        call_command("remotenode", "remove", "CT")
    assert RemoteNode.objects.count() == 1


def test_its_echo_exits_non_zero_when_the_node_does_not_answer(scp: Scp, capsys) -> None:
    add("Ourselves", "PACSPORTAL", "127.0.0.1", str(scp.port))
    add("Gone", "GONE", "127.0.0.1", str(free_port()))
    call_command("remotenode", "echo", "Ourselves")
    assert "Ourselves (PACSPORTAL@127.0.0.1" in capsys.readouterr().out
    with pytest.raises(CommandError, match="Gone .*cannot connect") as raised:
        call_command("remotenode", "echo", "Gone", "--timeout", "2")
    assert raised.value.returncode == 1
    with pytest.raises(CommandError, match="no remote node named"):
        call_command("remotenode", "echo", "Nobody")


# C-ECHO as an SCU


def test_it_verifies_a_node_that_answers(scp: Scp) -> None:
    ok, text = verify("PACSPORTAL", "127.0.0.1", scp.port, calling_ae="PACSPORTAL_SCU")
    assert ok, text
    assert text.startswith("C-ECHO succeeded in ") and text.endswith(" ms")


def test_it_says_when_nothing_listens() -> None:
    ok, text = verify("PACSPORTAL", "127.0.0.1", free_port(), calling_ae="ME", timeout=2)
    assert not ok
    assert "cannot connect to 127.0.0.1:" in text
    assert "refused" in text.lower()


def test_it_says_when_the_host_is_unknown() -> None:
    ok, text = verify("PACSPORTAL", "no-such-host.invalid", 104, calling_ae="ME", timeout=2)
    assert not ok
    assert "cannot connect to no-such-host.invalid:104" in text


def test_it_says_when_the_called_ae_title_is_wrong(scp: Scp) -> None:
    ok, text = verify("SOMEONE_ELSE", "127.0.0.1", scp.port, calling_ae="ME")
    assert not ok
    assert text.startswith(f"association rejected by SOMEONE_ELSE@127.0.0.1:{scp.port}")
    assert "Called AE title not recognised" in text


@pytest.fixture
def peer() -> Iterator:
    """Start pynetdicom SCPs with odd behaviours; stop them after the test."""
    servers = []

    def start(contexts: list[str], echo_status: int = 0x0000) -> int:
        ae = AE(ae_title="PEER")
        for uid in contexts:
            ae.add_supported_context(uid)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda event: echo_status)]
        )
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize(
    "contexts, echo_status, expected",
    [
        ([Verification], 0x0000, "C-ECHO succeeded"),
        ([Verification], 0x0211, "C-ECHO status 0x0211 (Refused: unrecognized operation) from PEER@"),
        ([CTImageStorage], 0x0000, "accepted the association but not the Verification SOP Class"),
    ],
)
def test_it_reports_what_the_peer_answered(peer, contexts: list[str], echo_status: int, expected: str) -> None:
    port = peer(contexts, echo_status)
    ok, text = verify("PEER", "127.0.0.1", port, calling_ae="ME", timeout=5)
    assert ok is (echo_status == 0x0000 and contexts == [Verification])
    assert expected in text


def test_it_gives_up_on_a_peer_that_never_answers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, says nothing
        ok, text = verify("SILENT", "127.0.0.1", silent.getsockname()[1], calling_ae="ME", timeout=0.5)
    assert not ok
    assert "no answer to the association request from SILENT@127.0.0.1" in text


# The admin


@pytest.fixture
def admin_client(db) -> Client:
    user = User.objects.create_superuser("alice", "alice@example.org", "a-long-password-1")
    client = Client()
    client.force_login(user)
    return client


def test_the_admin_action_verifies_each_node_with_c_echo(scp: Scp, admin_client: Client, settings) -> None:
    settings.PACS_AE_TITLE = "PORTAL_ADMIN"
    good = RemoteNode.objects.create(name="Ourselves", ae_title="PACSPORTAL", host="127.0.0.1", port=scp.port)
    gone_port = free_port()
    gone = RemoteNode.objects.create(name="Gone", ae_title="GONE", host="127.0.0.1", port=gone_port)
    RemoteNode.objects.create(name="Not selected", ae_title="OTHER", host="127.0.0.1", port=gone_port)

    response = admin_client.post(
        "/admin/archive/remotenode/",
        {"action": "verify_with_c_echo", "_selected_action": [good.pk, gone.pk]},
        follow=True,
    )
    assert response.status_code == 200
    sent = {m.message.split(" ")[0]: (m.level, m.message) for m in response.context["messages"]}
    assert sorted(sent) == ["Gone", "Ourselves"]
    level, message = sent["Ourselves"]
    assert level == message_levels.SUCCESS
    assert message.startswith(f"Ourselves (PACSPORTAL@127.0.0.1:{scp.port}) is reachable: C-ECHO succeeded in ")
    level, message = sent["Gone"]
    assert level == message_levels.ERROR
    assert message.startswith(f"Gone (GONE@127.0.0.1:{gone_port}) could not be verified: cannot connect to")
    body = response.content.decode()  # both shown on the change list, as a success and an error
    assert '<li class="success">Ourselves (PACSPORTAL@' in body
    assert '<li class="error">Gone (GONE@' in body


def test_the_admin_lists_searches_and_validates_nodes(admin_client: Client) -> None:
    RemoteNode.objects.create(name="CT scanner", ae_title="CT01", host="10.0.0.5", port=104)
    RemoteNode.objects.create(name="Workstation", ae_title="OSIRIX", host="ws.example.org", port=11112, may_store=False)
    body = admin_client.get("/admin/archive/remotenode/?q=OSIRIX").content.decode()
    assert "ws.example.org" in body and "10.0.0.5" not in body
    body = admin_client.get("/admin/archive/remotenode/?may_store__exact=0").content.decode()
    assert "Workstation" in body and "CT scanner" not in body

    form = {"name": "MR", "ae_title": "BAD\\AE", "host": "10.0.0.6", "port": "104", "may_store": "on"}
    page = admin_client.post("/admin/archive/remotenode/add/", form)
    assert page.status_code == 200
    assert "must not contain a backslash" in page.content.decode()
    form["ae_title"] = "MR01"
    assert admin_client.post("/admin/archive/remotenode/add/", form).status_code == 302
    mr = RemoteNode.objects.get(name="MR")
    assert (mr.may_store, mr.may_query, mr.may_retrieve) == (True, False, False)


@pytest.mark.django_db
def test_a_changed_node_applies_at_once_despite_the_cached_rights(settings) -> None:
    from archive.access import node_access
    from archive.models import AccessLabel

    settings.PACS_QR_KNOWN_NODES_ONLY = True
    assert node_access("WS1").may_query is False  # unknown: refused, and cached
    node = RemoteNode.objects.create(name="ws1", ae_title="WS1", host="127.0.0.1", port=104, may_query=True)
    assert node_access("WS1").may_query is True
    node.may_query = False
    node.save()
    assert node_access("WS1").may_query is False
    label = AccessLabel.objects.create(name="Cardiology")
    node.access_labels.add(label)
    assert node_access("WS1").label_ids == (label.pk,)
    node.delete()
    assert node_access("WS1").known is False
