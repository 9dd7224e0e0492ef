"""The retrieve service: the instances a request names, and their files as a peer can take them.

C-MOVE, C-GET, WADO-RS, ZIP downloads and sends to remote nodes use it. ``instances``
resolves a query (the query service's level and keys) to the stored instances under the
matching rows, in one database query; ``load`` reads a stored file and, when the peer does
not accept its transfer syntax, transcodes it to one it does (decompressing with pydicom and
the pylibjpeg plugins when needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from django.db.models import QuerySet
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive import query, storage
from archive.models import Instance

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
# From a query level to the path from Instance to that level's row.
_INSTANCE_PATH = {"PATIENT": "series__study__patient__in", "STUDY": "series__study__in", "SERIES": "series__in", "IMAGE": "pk__in"}


@dataclass(frozen=True)
class StoredInstance:
    """What a sender needs to know of one stored instance."""

    pk: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str


class RetrieveError(Exception):
    """A stored instance cannot be read or put into a syntax the peer accepts."""


def instances(level: str, identifier: Mapping[str, Any], *, queryset: QuerySet | None = None) -> list[StoredInstance]:
    """The instances under the rows a query matches (raises ``query.QueryError``)."""
    plan = query.plan_query(level, identifier)
    matched = plan.queryset(queryset).values("pk")
    rows = (
        Instance.objects.filter(**{_INSTANCE_PATH[plan.level]: matched})
        .order_by("series__study_id", "series__series_number", "series_id", "instance_number", "pk")
        .values_list("pk", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "file_path")
    )
    return [StoredInstance(*row) for row in rows]


def wanted_syntaxes(stored: Sequence[StoredInstance]) -> dict[str, list[str]]:
    """SOP class -> the transfer syntaxes to propose for it: the stored ones, then uncompressed."""
    syntaxes: dict[str, list[str]] = {}
    for item in stored:
        wanted = syntaxes.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in wanted:
            wanted.append(item.transfer_syntax_uid)
    for wanted in syntaxes.values():
        for syntax in UNCOMPRESSED:
            if syntax not in wanted:
                wanted.append(syntax)
    return syntaxes


def outgoing(item: StoredInstance, accepted: Sequence[str]) -> Path | Dataset:
    """What to hand to pynetdicom's ``send_c_store``: the stored file's path when the peer
    accepts its transfer syntax (sent without decoding), else the transcoded dataset."""
    if item.transfer_syntax_uid in accepted:
        return storage.absolute(item.file_path)
    return load(item, accepted)


def load(item: StoredInstance, accepted: Sequence[str]) -> Dataset:
    """Read a stored instance, transcoded if needed to one of the ``accepted`` syntaxes.

    A file whose syntax is accepted is sent as stored. A compressed one the peer cannot
    take is decompressed to Explicit VR Little Endian (the sender converts between the
    uncompressed syntaxes). Raises ``RetrieveError`` when neither is possible.
    """
    path = storage.absolute(item.file_path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is this instance's failure
        raise RetrieveError(f"cannot read the stored file of {item.sop_instance_uid}: {exc}") from exc
    syntax = UID(item.transfer_syntax_uid)
    if syntax in accepted or (not syntax.is_compressed and any(UID(a) in UNCOMPRESSED for a in accepted)):
        return ds
    if not any(UID(a) in UNCOMPRESSED for a in accepted):
        raise RetrieveError(f"the peer accepts neither {syntax.name} nor an uncompressed syntax for {item.sop_instance_uid}")
    try:
        ds.decompress()
    except Exception as exc:  # noqa: BLE001 - a codec that fails is this instance's failure
        raise RetrieveError(f"cannot decompress {item.sop_instance_uid} ({syntax.name}): {exc}") from exc
    return ds
