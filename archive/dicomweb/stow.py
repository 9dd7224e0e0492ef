"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related application/dicom.

Every part goes through the ingest service, as C-STORE does. The answer lists each stored
instance in ReferencedSOPSequence (with its RetrieveURL) and each refused one in
FailedSOPSequence with a FailureReason (PS3.18 Table 10.5.3-2 uses the C-STORE statuses);
200 when all were stored, 409 when some were not. Bodies over PACS_STOW_MAX_BYTES get 413,
bodies that are not multipart/related application/dicom get 400 or 415 and store nothing.
"""

from __future__ import annotations

import io

import pydicom
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from pydicom.dataset import Dataset

import audit
from archive import access
from archive.dicomweb import multipart
from archive.ingest import Outcome, Source, announce_series, ingest_bytes

# FailureReason (0008,1197) by ingest outcome: the C-STORE status codes
FAILURE_REASON = {
    Outcome.REJECTED: 0xC000,
    Outcome.MISMATCH: 0xA900,
    Outcome.OUT_OF_RESOURCES: 0xA700,
    Outcome.FAILED: 0x0110,
}
STUDY_MISMATCH = 0xA900


def store(request: HttpRequest, study_uid: str | None) -> HttpResponse:
    if not access.has(request.user, "archive.import_study"):
        audit.record("store", channel="dicomweb", request=request, outcome="denied", study_instance_uid=study_uid or "")
        return JsonResponse({"error": "your account may not store instances"}, status=403)
    media, params = multipart.parameters(request.headers.get("Content-Type", ""))
    if media != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
        return JsonResponse({"error": 'send multipart/related; type="application/dicom"'}, status=415)
    boundary = params.get("boundary")
    if not boundary:
        return JsonResponse({"error": "the Content-Type has no boundary"}, status=400)
    length = int(request.headers.get("Content-Length") or 0)
    limit = settings.PACS_STOW_MAX_BYTES
    if length > limit:
        return JsonResponse({"error": f"the body is larger than {limit} bytes (PACS_STOW_MAX_BYTES)"}, status=413)
    body = request.read(limit + 1)
    if len(body) > limit:
        return JsonResponse({"error": f"the body is larger than {limit} bytes (PACS_STOW_MAX_BYTES)"}, status=413)
    try:
        parts = list(multipart.parse(body, boundary))
    except multipart.MultipartError as exc:
        return JsonResponse({"error": f"malformed multipart body: {exc}"}, status=400)
    if not parts:
        return JsonResponse({"error": "the body holds no part"}, status=400)
    bad = [p.media_type for p in parts if p.media_type not in ("application/dicom", "")]
    if bad:
        return JsonResponse({"error": f"a part is {bad[0]!r}, not application/dicom; nothing was stored"}, status=400)
    source = Source(channel="stow", address=request.META.get("REMOTE_ADDR", ""), user_id=request.user.pk)
    base = request.build_absolute_uri(reverse("dicomweb:studies"))
    referenced, failed, series_ids, studies = [], [], set(), set()
    for part in parts:
        part.body = with_preamble(part.body)
        sop_class, sop_instance, part_study, part_series = _identity(part.body)
        if study_uid and part_study and part_study != study_uid:
            failed.append(_failed(sop_class, sop_instance, STUDY_MISMATCH))
            continue
        result = ingest_bytes(part.body, source)
        if result.ok:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = result.sop_instance_uid or sop_instance
            item.RetrieveURL = f"{base}/{part_study}/series/{part_series}/instances/{item.ReferencedSOPInstanceUID}"
            referenced.append(item)
            studies.add(part_study)
            if result.series_id:
                series_ids.add(result.series_id)
        else:
            failed.append(_failed(sop_class, sop_instance or result.sop_instance_uid, FAILURE_REASON.get(result.outcome, 0x0110)))
    announce_series(store, series_ids)
    answer = Dataset()
    if study_uid or len(studies) == 1:
        answer.RetrieveURL = f"{base}/{study_uid or next(iter(studies))}"
    answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    audit.record(
        "store",
        channel="dicomweb",
        request=request,
        outcome="success" if not failed else "failure",
        study_instance_uid=study_uid or (next(iter(studies)) if len(studies) == 1 else ""),
        details={"stored": len(referenced), "failed": len(failed)},
    )
    return JsonResponse(answer.to_json_dict(), status=409 if failed else 200, content_type="application/dicom+json")


def with_preamble(data: bytes) -> bytes:
    """A part that starts with its File Meta Information but lacks the 128-byte preamble and
    "DICM" (pydicom writes datasets so unless told otherwise) gets them, so that the archive
    keeps a proper Part 10 file (PS3.10 7.1). Anything else is left for the ingest service."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00" and len(data) > 12:
        return b"\x00" * 128 + b"DICM" + data
    return data


IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _identity(data: bytes) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study Instance, Series Instance UIDs) of a part, "" where unreadable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True, specific_tags=list(IDENTITY))
    except Exception:  # noqa: BLE001 - the ingest service says why it refuses it
        return "", "", "", ""
    return tuple(str(ds.get(keyword, "") or "") for keyword in IDENTITY)  # type: ignore[return-value]


def _failed(sop_class: str, sop_instance: str, reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    item.FailureReason = reason
    return item
