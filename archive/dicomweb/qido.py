"""QIDO-RS (PS3.18 10.6): search studies, series and instances through the query engine.

Query parameters are matching keys by keyword or tag (``PatientName=doe*``, ``00100020=P1``),
with the engine's PS3.4 C.2.2.2 matching; ``includefield`` (keywords, tags or ``all``),
``fuzzymatching`` (person names are matched case- and accent-insensitively either way),
``limit`` and ``offset``. Answers are DICOM JSON (application/dicom+json) with RetrieveURL.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from pydicom.datadict import keyword_for_tag, tag_for_keyword

import audit
from archive import access, query
from archive.dicomweb.auth import dicomweb_view

# Default return attributes by level (PS3.18 Table 10.6.3-3, -4, -5).
DEFAULTS = {
    "STUDY": [
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
        "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ],
    "SERIES": ["Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
               "BodyPartExamined", "SeriesDate", "SeriesTime"],
    "IMAGE": ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"],
}
CONTROL = {"includefield", "fuzzymatching", "limit", "offset", "orderby"}
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000


def keyword_of(name: str) -> str:
    """A QIDO attribute ID (keyword or 8 hex digits) as a keyword; raises QueryError."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif name.isalnum() and tag_for_keyword(name) is not None:
        return name
    raise query.QueryError(f"{name[:40]!r} is not a DICOM attribute keyword or tag")


def search(request: HttpRequest, level: str, fixed: dict[str, str]) -> HttpResponse:
    """Run a QIDO-RS search at ``level`` with the path's UIDs in ``fixed``."""
    keys: dict[str, Any] = {}
    include_all = False
    for name in request.GET:
        if name in CONTROL:
            continue
        keyword = keyword_of(name)
        values = request.GET.getlist(name)
        # a UID list may come as repeated parameters or comma-separated (PS3.18 8.3.4.1)
        keys[keyword] = "\\".join(v.replace(",", "\\") for v in values) if keyword.endswith("UID") else values[-1]
    for value in request.GET.getlist("includefield"):
        for item in value.split(","):
            item = item.strip()
            if item == "all":
                include_all = True
            elif item:
                keys.setdefault(keyword_of(item), "")
    levels = ["STUDY"] if level == "STUDY" else ["STUDY", "SERIES"] if level == "SERIES" else ["STUDY", "SERIES", "IMAGE"]
    if level != "STUDY" and "StudyInstanceUID" in fixed:
        levels = levels[1:]  # below a given study, its attributes are not repeated
    if level == "IMAGE" and "SeriesInstanceUID" in fixed:
        levels = ["IMAGE"]
    for name in levels:
        for keyword in DEFAULTS[name]:
            keys.setdefault(keyword, "")
    if include_all:
        for attribute in query.ATTRIBUTES.values():
            if query.level_index(attribute.level) <= query.level_index(level):
                keys.setdefault(attribute.keyword, "")
    keys.update(fixed)
    limit = _int(request.GET.get("limit"), MAX_LIMIT, "limit")
    offset = _int(request.GET.get("offset"), 0, "offset")
    if offset > MAX_OFFSET:
        raise query.QueryError(f"offset must be at most {MAX_OFFSET}")
    scope = {"STUDY": access.studies_for, "SERIES": access.series_for, "IMAGE": access.instances_for}[level]
    rows = list(query.find(level, keys, limit=min(limit, MAX_LIMIT) + offset, queryset=scope(request.user, "view")))[offset:]
    base = request.build_absolute_uri(reverse("dicomweb:studies"))
    answers = [_json(answer, level, base) for answer in rows]
    audit.record(
        "query",
        channel="dicomweb",
        request=request,
        patient_id=str(keys.get("PatientID", "") or "") if "*" not in str(keys.get("PatientID", "")) else "",
        study_instance_uid=fixed.get("StudyInstanceUID", ""),
        details={"level": level, "keys": {k: str(v)[:128] for k, v in keys.items() if v}, "answers": len(answers)},
    )
    if not answers:
        return HttpResponse(status=204)
    response = JsonResponse(answers, safe=False, content_type="application/dicom+json")
    return response


def _json(answer: dict[str, Any], level: str, base: str) -> dict[str, Any]:
    data = query.answer_json(answer)
    url = f"{base}/{answer['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{answer['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{answer['SOPInstanceUID']}"
    data["00081190"] = {"vr": "UR", "Value": [url]}
    return data


def _int(value: str | None, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise query.QueryError(f"{name} must be a whole number") from None
    if number < 0:
        raise query.QueryError(f"{name} must not be negative")
    return number


@dicomweb_view
def studies(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        from archive.dicomweb.stow import store

        return store(request, None)
    return search(request, "STUDY", {})


@dicomweb_view
def all_series(request: HttpRequest) -> HttpResponse:
    return search(request, "SERIES", {})


@dicomweb_view
def study_series(request: HttpRequest, study: str) -> HttpResponse:
    return search(request, "SERIES", {"StudyInstanceUID": study})


@dicomweb_view
def all_instances(request: HttpRequest) -> HttpResponse:
    return search(request, "IMAGE", {})


@dicomweb_view
def study_instances(request: HttpRequest, study: str) -> HttpResponse:
    return search(request, "IMAGE", {"StudyInstanceUID": study})


@dicomweb_view
def series_instances(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return search(request, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series})
