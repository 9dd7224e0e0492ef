"""docs/conformance.md must say what the code does."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from pynetdicom import AllStoragePresentationContexts

from archive.dimse.server import ACCEPTED_TRANSFER_SYNTAXES, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Scp

DOC = (Path(settings.BASE_DIR) / "docs" / "conformance.md").read_text()


def test_every_storage_sop_class_accepted_is_listed() -> None:
    scp = Scp(ae_title="PACSPORTAL", port=0)
    accepted = {str(cx.abstract_syntax) for cx in scp.ae.supported_contexts}
    assert accepted >= {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    for uid in accepted:
        assert f"| {uid} |" in DOC, uid


def test_transfer_syntaxes_are_listed_in_order_of_preference() -> None:
    rows = [line for line in DOC.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    listed = [row.split("|")[3].strip() for row in rows]
    assert listed == [str(uid) for uid in ACCEPTED_TRANSFER_SYNTAXES]
    scp = Scp(ae_title="PACSPORTAL", port=0)
    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    for cx in scp.ae.supported_contexts:
        if str(cx.abstract_syntax) in storage:
            assert [str(t) for t in cx.transfer_syntax] == listed


def test_the_implementation_identity_is_stated() -> None:
    assert IMPLEMENTATION_CLASS_UID in DOC
    assert IMPLEMENTATION_VERSION_NAME in DOC
