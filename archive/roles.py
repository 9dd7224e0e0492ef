"""The roles of ARCHITECTURE.md ("Roles"): Django groups and the permissions each holds.

Administrator: everything. Radiologist: every study, images, download, status. Clinician and
Technologist: the studies within their access labels, with images; Technologists also import
and correct demographics. RIS: searching every study and changing their status, no pixel data
(the web pages need ``view_images``; the RIS uses the API).
"""

from __future__ import annotations

from typing import Any

SEARCH = ["archive.view_patient", "archive.view_study", "archive.view_series", "archive.view_instance"]
ROLES: dict[str, list[str] | None] = {
    "Administrator": None,  # every permission
    "Radiologist": SEARCH
    + ["archive.view_all_studies", "archive.view_images", "archive.download_study", "archive.change_study_status"],
    "Clinician": SEARCH + ["archive.view_images"],
    "Technologist": SEARCH + ["archive.view_images", "archive.import_study", "archive.correct_demographics"],
    # the RIS searches every study (orders come from everywhere); it gets no pixel data
    "RIS": SEARCH + ["archive.view_all_studies", "archive.change_study_status"],
}


def ensure_roles(group_model: Any, permission_model: Any) -> None:
    """Create the role groups with their permissions (models given: real or a migration's)."""
    for name, codes in ROLES.items():
        group, _ = group_model.objects.get_or_create(name=name)
        if codes is None:
            group.permissions.set(permission_model.objects.all())
            continue
        permissions = []
        for code in codes:
            app_label, codename = code.split(".")
            permissions.append(permission_model.objects.get(content_type__app_label=app_label, codename=codename))
        group.permissions.set(permissions)
