"""Template filters that show DICOM values the way a reader expects them."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def person_name(value: str | None) -> str:
    """A PN value (PS3.5 6.2) for people: 'Doe^Jane^^Dr' -> 'DOE, Jane' (alphabetic group)."""
    if not value:
        return ""
    alphabetic = str(value).split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family = parts[0] if parts else ""
    given = " ".join(p for p in parts[1:3] if p)
    if family and given:
        return f"{family.upper()}, {given}"
    return family.upper() or given


@register.filter
def modalities(value: str | None) -> str:
    """ModalitiesInStudy as stored (backslash-separated) -> 'CT, PT'."""
    return ", ".join(v for v in (value or "").split("\\") if v)
