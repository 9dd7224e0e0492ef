"""Reads behind the portal's pages: the study list search and the viewer's slice lists.

The study list speaks to the query engine (``archive.query``) in DICOM keywords, so that it
matches exactly as C-FIND and QIDO-RS do; the form's fields are translated here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Exists, OuterRef, Q, QuerySet

from archive import query
from archive.models import Series, Study

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
            text=params.get("q", "").replace("\x00", "").strip()[:64],
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


def ordered_series(study: Study) -> list[Series]:
    """A study's series in series number order (unnumbered last)."""
    series = list(study.series.all())
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.pk))
    return series
