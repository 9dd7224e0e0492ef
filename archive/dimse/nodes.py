"""Which DICOM nodes may use which service: the DIMSE side of the nodes' rights."""

from __future__ import annotations

from django.conf import settings


def node_may(ae_title: str, right: str) -> bool:
    """Return whether the calling AE title may ``right`` ("query" or "retrieve").

    Any AE may, unless PACS_QR_KNOWN_NODES_ONLY is on: then only a RemoteNode with that AE
    title and that right.
    """
    if not settings.PACS_QR_KNOWN_NODES_ONLY:
        return True
    from archive.models import RemoteNode

    return RemoteNode.objects.filter(ae_title=ae_title, **{f"may_{right}": True}).exists()
