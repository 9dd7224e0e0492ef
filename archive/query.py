"""The query service: DICOM matching keys in, matching rows as DICOM attributes out.

One engine for C-FIND, QIDO-RS, the REST API's search and the study list. A query names a
level (PATIENT, STUDY, SERIES, IMAGE) and an identifier (a mapping of DICOM keywords to
values as they appear in a C-FIND identifier or QIDO-RS parameters, decoded to Unicode);
``find`` turns it into one database query for the level (plus, when asked for, one more
for SOPClassesInStudy) and yields one answer per matching row, a mapping of keywords to
values in DICOM's string forms (DA as YYYYMMDD, TM as HHMMSS.FFFFFF, PN with ``^``).

Matching follows PS3.4 C.2.2.2: single value, universal (an empty value: the attribute is
returned, not matched), wildcard (``*`` and ``?``), range (DA, TM; StudyDate with StudyTime
combined), and list of UIDs. Keys the archive does not index are returned from the stored
header of a representative instance and not used for matching, as C.2.2.1.2 allows for
optional keys. No Django request or pynetdicom object crosses this module's edge.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import CharField, Count, Exists, Lookup, OuterRef, Q, QuerySet, Subquery, Sum
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from archive import compiled
from archive.dicom import is_valid_uid, normalize_name, parse_da, parse_tm
from archive.models import Instance, Patient, Series, Study

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}
# ORM path from a query level's model to the model of an attribute's level.
_PREFIX = {
    ("PATIENT", "PATIENT"): "",
    ("STUDY", "PATIENT"): "patient__",
    ("STUDY", "STUDY"): "",
    ("SERIES", "PATIENT"): "study__patient__",
    ("SERIES", "STUDY"): "study__",
    ("SERIES", "SERIES"): "",
    ("IMAGE", "PATIENT"): "series__study__patient__",
    ("IMAGE", "STUDY"): "series__study__",
    ("IMAGE", "SERIES"): "series__",
    ("IMAGE", "IMAGE"): "",
}
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Limits on what an identifier may hold: beyond them it is refused, not truncated.
MAX_KEYS = 300
MAX_VALUE_LENGTH = 10_000
MAX_UIDS = 1_000


class QueryError(ValueError):
    """An identifier the engine cannot use; ``str(exc)`` says why, for the error comment."""


@dataclass(frozen=True)
class Attribute:
    """An attribute the archive indexes: its VR, level and column (None: computed)."""

    keyword: str
    vr: str
    level: str
    field: str | None


_ATTRIBUTES = [
    Attribute("PatientName", "PN", "PATIENT", "patient_name"),
    Attribute("PatientID", "LO", "PATIENT", "patient_id"),
    Attribute("IssuerOfPatientID", "LO", "PATIENT", "issuer_of_patient_id"),
    Attribute("PatientBirthDate", "DA", "PATIENT", "patient_birth_date"),
    Attribute("PatientSex", "CS", "PATIENT", "patient_sex"),
    Attribute("NumberOfPatientRelatedStudies", "IS", "PATIENT", None),
    Attribute("NumberOfPatientRelatedSeries", "IS", "PATIENT", None),
    Attribute("NumberOfPatientRelatedInstances", "IS", "PATIENT", None),
    Attribute("StudyInstanceUID", "UI", "STUDY", "study_instance_uid"),
    Attribute("StudyDate", "DA", "STUDY", "study_date"),
    Attribute("StudyTime", "TM", "STUDY", "study_time"),
    Attribute("AccessionNumber", "SH", "STUDY", "accession_number"),
    Attribute("StudyID", "SH", "STUDY", "study_id"),
    Attribute("StudyDescription", "LO", "STUDY", "study_description"),
    Attribute("ReferringPhysicianName", "PN", "STUDY", "referring_physician_name"),
    Attribute("InstitutionName", "LO", "STUDY", "institution_name"),
    Attribute("ModalitiesInStudy", "CS", "STUDY", "modalities_in_study"),
    Attribute("NumberOfStudyRelatedSeries", "IS", "STUDY", "number_of_study_related_series"),
    Attribute("NumberOfStudyRelatedInstances", "IS", "STUDY", "number_of_study_related_instances"),
    Attribute("SOPClassesInStudy", "UI", "STUDY", None),
    Attribute("SeriesInstanceUID", "UI", "SERIES", "series_instance_uid"),
    Attribute("Modality", "CS", "SERIES", "modality"),
    Attribute("SeriesNumber", "IS", "SERIES", "series_number"),
    Attribute("SeriesDescription", "LO", "SERIES", "series_description"),
    Attribute("BodyPartExamined", "CS", "SERIES", "body_part_examined"),
    Attribute("ProtocolName", "LO", "SERIES", "protocol_name"),
    Attribute("SeriesDate", "DA", "SERIES", "series_date"),
    Attribute("SeriesTime", "TM", "SERIES", "series_time"),
    Attribute("StationName", "SH", "SERIES", "station_name"),
    Attribute("NumberOfSeriesRelatedInstances", "IS", "SERIES", "number_of_series_related_instances"),
    Attribute("SOPInstanceUID", "UI", "IMAGE", "sop_instance_uid"),
    Attribute("SOPClassUID", "UI", "IMAGE", "sop_class_uid"),
    Attribute("InstanceNumber", "IS", "IMAGE", "instance_number"),
    Attribute("Rows", "US", "IMAGE", "rows"),
    Attribute("Columns", "US", "IMAGE", "columns"),
    Attribute("BitsAllocated", "US", "IMAGE", "bits_allocated"),
    Attribute("NumberOfFrames", "IS", "IMAGE", "number_of_frames"),
]
ATTRIBUTES: dict[str, Attribute] = {a.keyword: a for a in _ATTRIBUTES}
# Computed attributes (C.3.4 and C.6.1.1.5): returned, never matched.
RETURN_ONLY = {a.keyword for a in _ATTRIBUTES if a.keyword.startswith("NumberOf")} | {"SOPClassesInStudy"}
# Keys that only steer the query; never matched or returned as attributes.
_CONTROL_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
_TEXT_VRS = {"PN", "LO", "SH", "CS", "LT", "ST", "UT", "UC", "AE"}


def answer_dataset(answer: Mapping[str, Any]) -> Dataset:
    """An answer of ``find`` as a pydicom Dataset (for C-FIND responses and DICOM JSON)."""
    ds = Dataset()
    if "SpecificCharacterSet" in answer:
        ds.SpecificCharacterSet = answer["SpecificCharacterSet"]
    for keyword, value in answer.items():
        if keyword != "SpecificCharacterSet":
            setattr(ds, keyword, value)
    return ds


_JSON_NUMBER_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}


def answer_json(answer: Mapping[str, Any]) -> dict[str, Any]:
    """An answer of ``find`` in the DICOM JSON model (PS3.18 F.2), without building a Dataset."""
    out: dict[str, Any] = {}
    for keyword, value in answer.items():
        if keyword == "QueryRetrieveLevel":
            continue
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        values = value if isinstance(value, list) else ([] if value in ("", None) else [value])
        element: dict[str, Any] = {"vr": vr}
        if values:
            if vr == "PN":
                element["Value"] = [_pn_json(str(v)) for v in values]
            elif vr in _JSON_NUMBER_VRS:
                element["Value"] = [_number(v) for v in values]
            else:
                element["Value"] = [str(v) for v in values]
        out[f"{tag:08X}"] = element
    return dict(sorted(out.items()))


def _pn_json(value: str) -> dict[str, str]:
    groups = value.split("=")
    return {name: text for name, text in zip(("Alphabetic", "Ideographic", "Phonetic"), groups) if text}


def _number(value: Any) -> int | float | str:
    if isinstance(value, (int, float)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)


def level_index(level: str) -> int:
    return LEVELS.index(level)


def find(
    level: str,
    identifier: Mapping[str, Any],
    *,
    limit: int | None = None,
    queryset: QuerySet | None = None,
    order_by: tuple[str, ...] = ("pk",),
) -> Iterator[dict[str, Any]]:
    """Yield the answers to a query at ``level`` (PS3.4 C.2.2 and C.4.1).

    ``identifier`` maps DICOM keywords to values; an empty value asks for the attribute
    without matching on it. ``queryset`` narrows the rows searched (the access service's
    scope); ``limit`` caps the answers. Raises ``QueryError`` before yielding anything
    when the level or a key cannot be used.
    """
    _, answers = find_counted(level, identifier, limit=limit, queryset=queryset, order_by=order_by)
    yield from answers


def find_counted(
    level: str,
    identifier: Mapping[str, Any],
    *,
    limit: int | None = None,
    queryset: QuerySet | None = None,
    order_by: tuple[str, ...] = ("pk",),
) -> tuple[int, Iterator[dict[str, Any]]]:
    """``find`` run now: (the number of answers, the answers, each built as it is taken).
    Raises ``QueryError`` when the level or a key cannot be used."""
    plan = plan_query(level, identifier)
    columns = plan.columns()
    if queryset is None:
        queryset = compiled.unrestricted(MODELS[plan.level].objects.all())

    def build(filters: Q) -> QuerySet:
        selected = plan.queryset(queryset, filters)
        if order_by:
            selected = selected.order_by(*order_by)
        if limit is not None:
            selected = selected[:limit]
        return selected.values(*columns)

    rows = compiled.fetch(("find", plan.level, tuple(columns), tuple(order_by), limit), plan.filters, queryset, build)
    sop_classes = plan.sop_classes_for([row["pk"] for row in rows]) if plan.wants_sop_classes else {}
    return len(rows), (plan.answer(row, sop_classes) for row in rows)


def count(level: str, identifier: Mapping[str, Any], *, queryset: QuerySet | None = None) -> int:
    """Return the number of rows a query matches (for paging and for limits)."""
    return plan_query(level, identifier).queryset(queryset).count()


def plan_query(level: str, identifier: Mapping[str, Any]) -> "QueryPlan":
    """Check a query and turn it into a plan; raise ``QueryError`` on what cannot be used."""
    if not isinstance(level, str) or level.strip().upper() not in LEVELS:
        raise QueryError(f"unknown query level {str(level)[:20]!r}: use one of {', '.join(LEVELS)}")
    level = level.strip().upper()
    if len(identifier) > MAX_KEYS:
        raise QueryError(f"the identifier has {len(identifier)} keys; at most {MAX_KEYS} are accepted")
    plan = QueryPlan(level)
    combined_date = _combined_study_datetime(level, identifier)
    for keyword, value in identifier.items():
        if keyword in _CONTROL_KEYS:
            continue
        text = _as_text(keyword, value)
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None or level_index(attribute.level) > level_index(level):
            plan.extra_keys.append(keyword)  # returned from the header if it holds it; never matched
            continue
        plan.returned.append(attribute)
        if text and not (combined_date and keyword in ("StudyDate", "StudyTime")):
            plan.filters &= _match(level, attribute, text)
    if combined_date:
        plan.filters &= combined_date
    return plan


class QueryPlan:
    """What one query selects and returns, at one level."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.filters = Q()
        self.returned: list[Attribute] = []
        self.extra_keys: list[str] = []
        self._columns = None  # set by _answer_columns, once the plan is complete

    @property
    def wants_sop_classes(self) -> bool:
        return any(a.keyword == "SOPClassesInStudy" for a in self.returned)

    def queryset(self, base: QuerySet | None, filters: Q | None = None) -> QuerySet:
        """The rows matching the plan's conditions (or ``filters`` in their place)."""
        model = MODELS[self.level]
        rows = base if base is not None else model.objects.all()
        rows = rows.filter(self.filters if filters is None else filters)
        wanted = {a.keyword for a in self.returned}
        if wanted & {"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"}:
            patient = OuterRef(_PREFIX[(self.level, "PATIENT")] + "pk")
            studies = Study.objects.filter(patient=patient).order_by().values("patient")
            if "NumberOfPatientRelatedStudies" in wanted:
                rows = rows.annotate(
                    n_studies=Subquery(studies.annotate(n=Count("pk")).values("n")),
                )
            if "NumberOfPatientRelatedSeries" in wanted:
                rows = rows.annotate(
                    n_series=Subquery(studies.annotate(n=Sum("number_of_study_related_series")).values("n"))
                )
            if "NumberOfPatientRelatedInstances" in wanted:
                rows = rows.annotate(
                    n_instances=Subquery(studies.annotate(n=Sum("number_of_study_related_instances")).values("n"))
                )
        if self.extra_keys:
            rows = rows.annotate(header=Subquery(_representative_header(self.level)))
        return rows

    def columns(self) -> list[str]:
        columns = ["pk"]
        for attribute in self.returned:
            column = self.column(attribute)
            if column and column not in columns:
                columns.append(column)
        # The unique keys of this level and the levels above are always returned.
        for upper in LEVELS[: level_index(self.level) + 1]:
            if self.level != "PATIENT" and upper == "PATIENT":
                continue
            column = self.column(ATTRIBUTES[UNIQUE_KEYS[upper]])
            if column not in columns:
                columns.append(column)
        if self.extra_keys:
            columns.append("header")
        return columns

    def column(self, attribute: Attribute) -> str | None:
        if attribute.field is None:
            return {
                "NumberOfPatientRelatedStudies": "n_studies",
                "NumberOfPatientRelatedSeries": "n_series",
                "NumberOfPatientRelatedInstances": "n_instances",
            }.get(attribute.keyword)
        return _PREFIX[(self.level, attribute.level)] + attribute.field

    def sop_classes_for(self, pks: list[int]) -> dict[int, list[str]]:
        """SOPClassesInStudy for the answered studies: one query for all of them."""
        found: dict[int, set[str]] = {}
        if self.level != "STUDY" or not pks:
            return {}
        for start in range(0, len(pks), 500):
            pairs = (
                Instance.objects.filter(series__study_id__in=pks[start : start + 500])
                .values_list("series__study_id", "sop_class_uid")
                .distinct()
            )
            for study_id, sop_class in pairs:
                found.setdefault(study_id, set()).add(sop_class)
        return {pk: sorted(values) for pk, values in found.items()}

    def answer(self, row: dict[str, Any], sop_classes: dict[int, list[str]]) -> dict[str, Any]:
        unique, returned = self._answer_columns()
        answer: dict[str, Any] = {"QueryRetrieveLevel": self.level}
        for keyword, column in unique:
            answer[keyword] = row[column] or ""
        for keyword, column, convert in returned:
            if column is None:  # SOPClassesInStudy
                answer[keyword] = sop_classes.get(row["pk"], [])
                continue
            value = row.get(column)
            answer[keyword] = "" if value is None else value if convert is None else convert(value)
        header = row.get("header") or {}
        for keyword in self.extra_keys:
            answer[keyword] = _header_value(header, keyword)
        for value in answer.values():
            if type(value) is str:
                if not value.isascii():
                    break
            elif _non_ascii(value):
                break
        else:
            return answer
        answer["SpecificCharacterSet"] = "ISO_IR 192"
        return answer

    def _answer_columns(self) -> tuple[list[tuple[str, str]], list[tuple[str, str | None, Any]]]:
        """(unique key, column) of this level and those above, and (keyword, column, value
        conversion or None) of the returned keys: worked out once per plan, not once per
        answer."""
        if self._columns is None:
            unique = [
                (UNIQUE_KEYS[upper], self.column(ATTRIBUTES[UNIQUE_KEYS[upper]]))
                for upper in LEVELS[: level_index(self.level) + 1]
                if self.level == "PATIENT" or upper != "PATIENT"
            ]
            returned = [
                (a.keyword, None if a.keyword == "SOPClassesInStudy" else self.column(a), _conversion(a))
                for a in self.returned
            ]
            self._columns = (unique, returned)  # type: ignore[assignment]
        return self._columns  # type: ignore[return-value]


# ----------------------------------------------------------------- matching, PS3.4 C.2.2.2


def _match(level: str, attribute: Attribute, value: str) -> Q:
    """The condition for one non-empty key."""
    column = _PREFIX[(level, attribute.level)] + (attribute.field or "")
    if attribute.keyword in RETURN_ONLY:
        raise QueryError(f"{attribute.keyword} is a return key only; it cannot be matched")
    if attribute.keyword == "ModalitiesInStudy":
        return _match_modalities(level, value)
    if attribute.vr == "UI":
        return _match_uids(attribute, column, value)
    if attribute.vr == "DA":
        return _match_date(attribute, column, value)
    if attribute.vr == "TM":
        return _match_time(attribute, column, value)
    if attribute.vr in ("IS", "US"):
        return _match_number(attribute, column, value)
    if attribute.vr == "PN":
        return _match_name(level, attribute, column, value)
    return _match_text(column, value, case_insensitive=False)


def _match_uids(attribute: Attribute, column: str, value: str) -> Q:
    """Single value or list of UIDs (C.2.2.2.2); no wildcards in UIDs (C.2.2.2.4)."""
    uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
    if len(uids) > MAX_UIDS:
        raise QueryError(f"{attribute.keyword} lists {len(uids)} UIDs; at most {MAX_UIDS} are accepted")
    for uid in uids:
        if not is_valid_uid(uid):
            raise QueryError(f"{attribute.keyword} holds {uid[:70]!r}, which is not a UID")
    if len(uids) == 1:
        return Q(**{column: uids[0]})
    return Q(**{f"{column}__in": uids})


def _match_number(attribute: Attribute, column: str, value: str) -> Q:
    numbers = []
    for part in value.split("\\"):
        try:
            numbers.append(int(part.strip()))
        except ValueError:
            raise QueryError(f"{attribute.keyword} holds {part[:20]!r}, which is not an integer") from None
    return Q(**{f"{column}__in": numbers}) if len(numbers) > 1 else Q(**{column: numbers[0]})


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _match_text(column: str, value: str, *, case_insensitive: bool) -> Q:
    """Single value or wildcard (C.2.2.2.1, C.2.2.2.4), with % and _ taken literally."""
    if value == "*":
        return Q()
    if not _has_wildcard(value):
        return Q(**{f"{column}__iexact" if case_insensitive else column: value})
    if value.endswith("*") and not _has_wildcard(value[:-1]):
        prefix = value[:-1]
        if not case_insensitive and prefix:
            # A range of the column in code point order: exact, and an index range scan on
            # both databases, with the values as parameters (so in a prepared statement's
            # generic plan too, which a LIKE with a parameter never gives). SQLite's LIKE
            # would ignore ASCII case and never use a plain index.
            matching = Q(**{f"{column}__from_prefix": prefix})
            upper = _after_prefix(prefix)
            return matching & Q(**{f"{column}__before_prefix": upper}) if upper else matching
        lookup = "istartswith" if case_insensitive else "startswith"
        return Q(**{f"{column}__{lookup}": prefix})
    lookup = "iregex" if case_insensitive else "regex"
    return Q(**{f"{column}__{lookup}": wildcard_regex(value)})


def _after_prefix(prefix: str) -> str | None:
    """The least string after every string that starts with ``prefix``, in code point order
    (which is UTF-8's byte order); None when there is none."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if code == 0xD800:
            code = 0xE000  # surrogates are not characters
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


class _CodePointOrder(Lookup):
    """A text column compared in code point order (the bounds of a prefix): PostgreSQL's
    pattern operators, which its ``varchar_pattern_ops`` indexes serve whatever the
    database's collation; SQLite's own comparison (BINARY collation)."""

    sqlite_operator = ""
    postgresql_operator = ""

    def as_sql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        if connection.vendor == "postgresql":
            return f"{lhs}::text {self.postgresql_operator} {rhs}", [*lhs_params, *rhs_params]
        if connection.vendor == "sqlite":
            return f"{lhs} {self.sqlite_operator} {rhs}", [*lhs_params, *rhs_params]
        raise NotImplementedError(f"{self.lookup_name} on {connection.vendor}")


@CharField.register_lookup
class FromPrefix(_CodePointOrder):
    lookup_name = "from_prefix"
    sqlite_operator = ">="
    postgresql_operator = "~>=~"


@CharField.register_lookup
class BeforePrefix(_CodePointOrder):
    lookup_name = "before_prefix"
    sqlite_operator = "<"
    postgresql_operator = "~<~"


def wildcard_regex(value: str) -> str:
    """A DICOM wildcard pattern as an anchored regular expression."""
    parts = []
    for char in value:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return "^" + "".join(parts) + "$"


def _match_name(level: str, attribute: Attribute, column: str, value: str) -> Q:
    """Person names (C.2.2.2.1 and C.2.2.2.4): case- and accent-insensitive by default.

    Trailing empty components do not count (``Doe^Jane^^^`` is ``Doe^Jane``), and a value
    matches a name's alphabetic, ideographic or phonetic group as well as the whole name.
    """
    value = value.rstrip("^ ")
    exact = settings.PACS_QUERY_NAME_MATCHING == "exact"
    if attribute.keyword == "PatientName" and not exact:
        column = _PREFIX[(level, "PATIENT")] + "patient_name_norm"
        value = normalize_name(value)
        return _match_groups(column, value, case_insensitive=False)
    return _match_groups(column, value, case_insensitive=not exact)


def _match_groups(column: str, value: str, *, case_insensitive: bool) -> Q:
    if _has_wildcard(value) or "=" in value:
        return _match_text(column, value, case_insensitive=case_insensitive)
    ci = "i" if case_insensitive else ""
    whole = Q(**{f"{column}__{ci}exact" if ci else column: value})
    return (
        whole
        | Q(**{f"{column}__{ci}startswith": value + "="})
        | Q(**{f"{column}__{ci}endswith": "=" + value})
        | Q(**{f"{column}__{ci}contains": "=" + value + "="})
    )


def _match_modalities(level: str, value: str) -> Q:
    """ModalitiesInStudy: a study matches when one of its series has one of the values."""
    if value == "*":
        return Q()
    study = OuterRef(_PREFIX[(level, "STUDY")] + "pk") if level != "STUDY" else OuterRef("pk")
    condition = Q()
    for modality in (m.strip() for m in value.split("\\") if m.strip()):
        condition |= _match_text("modality", modality, case_insensitive=False)
    return Q(Exists(Series.objects.filter(study=study).filter(condition)))


def _parse_range(attribute: Attribute, value: str, parse) -> tuple[Any, Any, bool]:
    """(low, high, is_range) of a DA or TM value; None for an open end (C.2.2.2.5)."""
    if value.count("-") > 1:
        raise QueryError(f"{attribute.keyword} range {value[:40]!r} has more than one '-'")
    if "-" not in value:
        single = parse(value)
        if single is None:
            raise QueryError(f"{attribute.keyword} {value[:40]!r} is not a valid {attribute.vr} value")
        return single, single, False
    low_text, high_text = (part.strip() for part in value.split("-"))
    if not low_text and not high_text:
        raise QueryError(f"{attribute.keyword} range '-' has no bound")
    low = parse(low_text) if low_text else None
    high = parse(high_text) if high_text else None
    if (low_text and low is None) or (high_text and high is None):
        raise QueryError(f"{attribute.keyword} range {value[:40]!r} is not made of valid {attribute.vr} values")
    if low is not None and high is not None and low > high:
        raise QueryError(f"{attribute.keyword} range {value[:40]!r} ends before it starts")
    return low, high, True


def _match_date(attribute: Attribute, column: str, value: str) -> Q:
    low, high, _ = _parse_range(attribute, value, parse_da)
    condition = Q()
    if low is not None:
        condition &= Q(**{f"{column}__gte": low})
    if high is not None:
        condition &= Q(**{f"{column}__lte": high})
    return condition


def _time_bounds(value: str) -> tuple[dt.time, dt.time] | None:
    """A TM value's span: "10" is 10:00:00 to 10:59:59.999999 (matching at its precision)."""
    start = parse_tm(value)
    if start is None:
        return None
    digits = len(value.strip().replace(":", "").split(".")[0])
    fraction = value.split(".")[1] if "." in value else ""
    if fraction:
        end = start.replace(microsecond=int(fraction.ljust(6, "9")[:6]))
    elif digits <= 2:
        end = start.replace(minute=59, second=59, microsecond=999999)
    elif digits <= 4:
        end = start.replace(second=59, microsecond=999999)
    else:
        end = start.replace(microsecond=999999)
    return start, end


def _match_time(attribute: Attribute, column: str, value: str) -> Q:
    low, high, is_range = _parse_range(attribute, value, _time_bounds)
    condition = Q()
    if low is not None:
        condition &= Q(**{f"{column}__gte": low[0]})
    if high is not None:
        condition &= Q(**{f"{column}__lte": high[1]})
    return condition


def _combined_study_datetime(level: str, identifier: Mapping[str, Any]) -> Q | None:
    """StudyDate and StudyTime together, when the date is a range (C.2.2.2.5.1): the
    range runs from the start date at the start time to the end date at the end time."""
    date_value = _as_text("StudyDate", identifier.get("StudyDate", ""))
    time_value = _as_text("StudyTime", identifier.get("StudyTime", ""))
    if level == "PATIENT" or "-" not in date_value or not time_value:
        return None
    date_attr, time_attr = ATTRIBUTES["StudyDate"], ATTRIBUTES["StudyTime"]
    d_low, d_high, _ = _parse_range(date_attr, date_value, parse_da)
    t_low, t_high, _ = _parse_range(time_attr, time_value, _time_bounds)
    prefix = _PREFIX[(level, "STUDY")]
    date, time = prefix + "study_date", prefix + "study_time"
    condition = Q()
    if d_low is not None:
        if t_low is not None:
            condition &= Q(**{f"{date}__gt": d_low}) | Q(**{date: d_low, f"{time}__gte": t_low[0]})
        else:
            condition &= Q(**{f"{date}__gte": d_low})
    if d_high is not None:
        if t_high is not None:
            condition &= Q(**{f"{date}__lt": d_high}) | Q(**{date: d_high, f"{time}__lte": t_high[1]})
        else:
            condition &= Q(**{f"{date}__lte": d_high})
    return condition


# ------------------------------------------------------------------------ values


def _as_text(keyword: str, value: Any) -> str:
    """A key's value as text; refuse what cannot be a matching key."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (str, int, float)) for v in value):
            raise QueryError(f"{keyword} holds a value that is not text")
        value = "\\".join(str(v) for v in value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise QueryError(f"{keyword} holds a {type(value).__name__}, not a text value (sequence matching is not supported)")
    if len(value) > MAX_VALUE_LENGTH:
        raise QueryError(f"{keyword} is {len(value)} characters long; at most {MAX_VALUE_LENGTH} are accepted")
    if "\x00" in value:
        # DICOM pads with NUL only UIDs, and a database cannot compare text holding one
        value = value.rstrip("\x00") if keyword.endswith("UID") else value
        if "\x00" in value:
            raise QueryError(f"{keyword} holds a NUL character")
    return value.strip()


def _da_text(value: Any) -> Any:
    """A date as DA (YYYYMMDD); anything else as it is."""
    if isinstance(value, dt.date):
        return f"{value.year:04d}{value.month:02d}{value.day:02d}"
    return value


def _tm_text(value: Any) -> Any:
    """A time as TM (HHMMSS, with .FFFFFF when it has microseconds); anything else as it is."""
    if isinstance(value, dt.time):
        text = f"{value.hour:02d}{value.minute:02d}{value.second:02d}"
        return f"{text}.{value.microsecond:06d}" if value.microsecond else text
    return value


def _modalities(value: Any) -> Any:
    return [m for m in value.split("\\") if m]


# How a date or time column's value (not None) becomes its attribute's DICOM value, by VR.
_CONVERSIONS = {"DA": _da_text, "TM": _tm_text}


def _conversion(attribute: Attribute) -> Any:
    """How a column's value (not None) becomes the attribute's DICOM value: DA and TM
    formatted, ModalitiesInStudy split; None for the rest (text and numbers, as they are)."""
    if attribute.keyword == "ModalitiesInStudy":
        return _modalities
    return _CONVERSIONS.get(attribute.vr)


def _header_value(header: dict, keyword: str) -> Any:
    """An unindexed attribute's value from a stored DICOM JSON header ("" when absent)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return ""
    element = header.get(f"{tag:08X}")
    if not element or "Value" not in element:
        return ""
    values = []
    for item in element["Value"]:
        if isinstance(item, dict):
            if element.get("vr") == "PN":
                groups = [item.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")]
                values.append("=".join(groups).rstrip("="))
            else:
                return ""  # a sequence: not returned by this engine
        else:
            values.append(item)
    return values[0] if len(values) == 1 else values


def _representative_header(level: str):
    """The header of one instance under each row of ``level`` (for unindexed keys)."""
    instances = Instance.objects.order_by("pk")
    if level == "IMAGE":
        return Instance.objects.filter(pk=OuterRef("pk")).values("metadata")[:1]
    if level == "SERIES":
        return instances.filter(series=OuterRef("pk")).values("metadata")[:1]
    if level == "STUDY":
        return instances.filter(series__study=OuterRef("pk")).values("metadata")[:1]
    return instances.filter(series__study__patient=OuterRef("pk")).values("metadata")[:1]


def _non_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, list):
        return any(not v.isascii() if type(v) is str else _non_ascii(v) for v in value)
    return False
