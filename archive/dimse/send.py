"""Sending stored instances to a DICOM node with C-STORE (PS3.4 Annex B, the SCU role):
the "send to node" action of the REST API, run by the task worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from django.conf import settings
from pynetdicom import AE
from pynetdicom.presentation import build_context

from archive import retrieve
from archive.dimse import storescu
from archive.models import RemoteNode


class SendError(Exception):
    """The node could not be reached or refused the association."""


def send(
    node: RemoteNode,
    items: Sequence[retrieve.StoredInstance],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """C-STORE ``items`` to ``node`` over one association; return (sent, failed).

    Each instance goes as stored when the node accepts its transfer syntax, otherwise
    decompressed (``storescu.Sender``). Raises ``SendError`` when no association is made.
    """
    ae = AE(ae_title=settings.PACS_AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = [
        build_context(sop_class, syntaxes)
        for sop_class, syntaxes in retrieve.wanted_syntaxes(items).items()
    ][:128]
    assoc = ae.associate(node.host, node.port, contexts=contexts, ae_title=node.ae_title)
    if not assoc.is_established:
        raise SendError(f"{node.ae_title} at {node.host}:{node.port} did not accept an association")
    sent = failed = 0
    try:
        with storescu.Sender(assoc) as sender:
            for index, item in enumerate(items):
                code = sender.store(item, index % 65535 + 1)
                if code in (0x0000, 0xB000, 0xB007, 0xB006):
                    sent += 1
                else:
                    failed += 1
                if progress:
                    progress(sent, failed)
                if not assoc.is_established or sender.broken:
                    failed += len(items) - sent - failed
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    return sent, failed
