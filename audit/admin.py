"""The audit log in admin: browse and filter (read-only), export as CSV or DICOM audit messages."""

from __future__ import annotations

import csv
import io

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from audit import dicom_audit
from audit.models import AuditEvent
from audit.services import record

CSV_FIELDS = [
    "id", "time", "actor", "role", "action", "channel", "outcome", "patient_id", "study_instance_uid",
    "source_address", "user_agent", "details", "hash",
]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("time", "actor", "role", "action", "channel", "outcome", "patient_id", "study_instance_uid", "source_address")
    list_filter = ("action", "outcome", "channel", ("time", admin.DateFieldListFilter))
    search_fields = ("=actor", "=patient_id", "=study_instance_uid", "=source_address")
    date_hierarchy = "time"
    actions = ["export_csv", "export_dicom"]
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
    list_per_page = 100
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    @admin.action(description="Export the selected events as CSV")
    def export_csv(self, request: HttpRequest, queryset) -> HttpResponse:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        count = 0
        for event in queryset.order_by("pk").iterator():
            writer.writerow([getattr(event, name) for name in CSV_FIELDS])
            count += 1
        record("audit-export", channel="admin", request=request, details={"format": "csv", "events": count})
        response = HttpResponse(out.getvalue(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="audit-events.csv"'
        return response

    @admin.action(description="Export the selected events as DICOM audit messages (XML)")
    def export_dicom(self, request: HttpRequest, queryset) -> HttpResponse:
        events = list(queryset.order_by("pk"))
        record("audit-export", channel="admin", request=request, details={"format": "dicom-xml", "events": len(events)})
        response = HttpResponse(dicom_audit.export(events), content_type="application/xml")
        response["Content-Disposition"] = 'attachment; filename="audit-messages.xml"'
        return response

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions
