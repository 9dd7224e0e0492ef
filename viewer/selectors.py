"""Reads behind the portal's pages: the study list search and the viewer's slice lists.

The study list speaks to the query engine (``archive.query``) in DICOM keywords, so that it
matches exactly as C-FIND and QIDO-RS do; the form's fields are translated here.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Exists, OuterRef, Q, QuerySet

from archive import query, render
from archive.models import Instance, Series, Study

# Sortable columns: form value -> ORM ordering (ties broken by the newest first).
SORTS = {
    "name": "patient__patient_name",
    "id": "patient__patient_id",
    "birth": "patient__patient_birth_date",
    "date": "study_date",
    "modalities": "modalities_in_study",
    "description": "study_description",
    "accession": "accession_number",
    "series": "number_of_study_related_series",
    "images": "number_of_study_related_instances",
}
DEFAULT_SORT = "-date"
QUICK_RANGES = {"today": (0, 0), "yesterday": (1, 1), "7d": (6, 0), "30d": (29, 0)}
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "NM", "PT", "XA", "RF", "OT", "SR")


@dataclass
class StudySearch:
    """The study list's form, cleaned; ``errors`` names fields that could not be used."""

    name: str = ""
    patient_id: str = ""
    accession: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    modality: str = ""
    text: str = ""
    sort: str = DEFAULT_SORT
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Any, today: dt.date) -> StudySearch:
        search = cls(
            name=params.get("name", "").strip()[:64],
            patient_id=params.get("patient_id", "").strip()[:64],
            accession=params.get("accession", "").strip()[:16],
            modality=params.get("modality", "").strip().upper()[:16],
            text=params.get("q", "").strip()[:64],
        )
        quick = params.get("range", "")
        if quick in QUICK_RANGES:
            back_from, back_to = QUICK_RANGES[quick]
            search.date_from = today - dt.timedelta(days=back_from)
            search.date_to = today - dt.timedelta(days=back_to)
        else:
            search.date_from = search._date(params, "date_from")
            search.date_to = search._date(params, "date_to")
        sort = params.get("sort", DEFAULT_SORT)
        search.sort = sort if sort.lstrip("-") in SORTS else DEFAULT_SORT
        if search.modality and not search.modality.isalnum():
            search.errors["modality"] = "A modality is letters and digits, such as CT or MR."
        return search

    def _date(self, params: Any, key: str) -> dt.date | None:
        value = params.get(key, "").strip()
        if not value:
            return None
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            self.errors[key] = "Use a date such as 2024-01-31."
            return None

    def identifier(self) -> dict[str, str]:
        """The search as C-FIND matching keys (PS3.4 C.2.2.2)."""
        keys: dict[str, str] = {}
        if self.name:
            keys["PatientName"] = _name_pattern(self.name)
        if self.patient_id:
            keys["PatientID"] = _pattern(self.patient_id)
        if self.accession:
            keys["AccessionNumber"] = _pattern(self.accession)
        if self.date_from or self.date_to:
            low = self.date_from.strftime("%Y%m%d") if self.date_from else ""
            high = self.date_to.strftime("%Y%m%d") if self.date_to else ""
            keys["StudyDate"] = f"{low}-{high}"
        if self.modality and "modality" not in self.errors:
            keys["ModalitiesInStudy"] = self.modality
        return keys

    def ordering(self) -> tuple[str, ...]:
        descending = self.sort.startswith("-")
        column = SORTS[self.sort.lstrip("-")]
        return (("-" if descending else "") + column, "-study_date", "-pk")


def _pattern(value: str) -> str:
    """What a user types is a prefix (``*`` and ``?`` are DICOM wildcards anywhere)."""
    return value if value.endswith("*") else value + "*"


def _name_pattern(value: str) -> str:
    """'doe jane' or 'Doe, Jane' as the PN pattern 'doe*^jane*'; typed ``^`` kept as is."""
    if "^" not in value:
        parts = [p for p in value.replace(",", " ").split() if p]
        value = "*^".join(p.rstrip("*") for p in parts)
    return _pattern(value) if value else ""


def search_studies(search: StudySearch, scope: QuerySet[Study]) -> QuerySet[Study]:
    """The studies in ``scope`` matching ``search``, ordered as asked (raises QueryError)."""
    rows = query.plan_query("STUDY", search.identifier()).queryset(scope)
    if search.text:
        in_series = Series.objects.filter(study=OuterRef("pk"), series_description__icontains=search.text)
        rows = rows.filter(Q(study_description__icontains=search.text) | Q(Exists(in_series)))
    return rows.select_related("patient").order_by(*search.ordering())


# ------------------------------------------------------------------------- the viewer's slices


def ordered_series(study: Study) -> list[Series]:
    """A study's series in series number order (unnumbered last)."""
    series = list(study.series.all())
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.pk))
    return series


def series_slices(series: Series) -> list[dict[str, Any]]:
    """Every frame of a series as a slice for the viewer, in anatomical order.

    Slices are ordered by their position along the slice normal (the cross product of the
    row and column directions of ImageOrientationPatient, PS3.3 C.7.6.2.1.1) when every
    slice has a position and they share one orientation; otherwise by InstanceNumber, then
    frame number.
    """
    instances = Instance.objects.filter(series=series).only(
        "pk", "sop_instance_uid", "file_sha256", "instance_number", "number_of_frames", "metadata", "file_path"
    )
    slices: list[dict[str, Any]] = []
    for instance in instances:
        info = render.image_info(instance.metadata, instance)
        version = render.etag(instance, 1, "v")[1:13]
        for frame in range(1, (info["frames"] or 1) + 1):
            positions = info["positions"]
            position = positions[frame - 1] if frame - 1 < len(positions) else (positions[0] if len(positions) == 1 else None)
            slices.append(
                {
                    "sop": instance.sop_instance_uid,
                    "frame": frame,
                    "version": version,
                    "instance_number": info["instance_number"],
                    "rows": info["rows"],
                    "columns": info["columns"],
                    "colour": info["colour"],
                    "invert": info["invert"],
                    "packed": info["packed"],
                    "signed": info["signed"],
                    "slope": info["slope"],
                    "intercept": info["intercept"],
                    "windows": info["windows"],
                    "pixel_spacing": info["pixel_spacing"],
                    "spacing_source": info["spacing_source"],
                    "orientation": info["orientation"],
                    "position": position,
                    "slice_thickness": info["slice_thickness"],
                    "slice_location": info["slice_location"],
                    "frames": info["frames"],
                }
            )
    slices.sort(key=_slice_order(slices))
    return slices


def _slice_order(slices: list[dict[str, Any]]):
    orientations = {tuple(round(v, 4) for v in s["orientation"]) for s in slices if s["orientation"]}
    if len(orientations) == 1 and all(s["position"] for s in slices) and len(slices) > 1:
        row, column = list(orientations)[0][:3], list(orientations)[0][3:]
        normal = (
            row[1] * column[2] - row[2] * column[1],
            row[2] * column[0] - row[0] * column[2],
            row[0] * column[1] - row[1] * column[0],
        )
        if math.isclose(sum(n * n for n in normal), 1.0, rel_tol=0.05):
            return lambda s: (sum(p * n for p, n in zip(s["position"], normal)), s["instance_number"] or 0, s["frame"])
    return lambda s: (s["instance_number"] is None, s["instance_number"] or 0, s["sop"], s["frame"])
