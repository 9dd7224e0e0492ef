"""Django admin for the archive: searchable and filterable, read-only (archive data only
changes through the ingest service and deliberate actions). Remote DICOM nodes are edited
here, and verified with C-ECHO."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from archive.dimse import echo
from archive.models import AccessLabel, Instance, LabelRule, Patient, RemoteNode, Series, Study


class ReadOnlyAdmin(admin.ModelAdmin):
    """Archive rows are written by the ingest service, never edited by hand here."""

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    """The child rows of an archive object, listed with a link to each."""

    show_change_link = True
    extra = 0
    can_delete = False

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return self.fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class StudyInline(ReadOnlyInline):
    model = Study
    fields = ("study_date", "modalities_in_study", "study_description", "accession_number", "number_of_study_related_instances")


class SeriesInline(ReadOnlyInline):
    model = Series
    fields = ("series_number", "modality", "series_description", "body_part_examined", "number_of_series_related_instances")


@admin.register(Patient)
class PatientAdmin(ReadOnlyAdmin):
    list_display = ("patient_name", "patient_id", "issuer_of_patient_id", "patient_birth_date", "patient_sex")
    search_fields = ("patient_name", "patient_name_norm", "=patient_id")
    list_filter = ("patient_sex",)
    inlines = [StudyInline]


class ModalityFilter(admin.SimpleListFilter):
    title = "modality"
    parameter_name = "modality"

    def lookups(self, request: HttpRequest, model_admin):
        values = Series.objects.order_by("modality").values_list("modality", flat=True).distinct()
        return [(m, m) for m in values if m]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(series__modality=self.value()).distinct()
        return queryset


@admin.register(Study)
class StudyAdmin(ReadOnlyAdmin):
    list_display = (
        "study_date",
        "patient",
        "modalities_in_study",
        "study_description",
        "accession_number",
        "number_of_study_related_series",
        "number_of_study_related_instances",
        "status",
    )
    list_select_related = ("patient",)
    search_fields = (
        "patient__patient_name",
        "patient__patient_name_norm",
        "=patient__patient_id",
        "=accession_number",
        "=study_instance_uid",
        "study_description",
    )
    list_filter = (ModalityFilter, "study_date", "status", "priority", "access_labels")
    date_hierarchy = "study_date"
    inlines = [SeriesInline]
    filter_horizontal = ("access_labels",)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # Only the access labels are set by hand; everything else comes from the instances.
        return admin.ModelAdmin.has_change_permission(self, request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [f.name for f in Study._meta.fields]


@admin.register(Series)
class SeriesAdmin(ReadOnlyAdmin):
    list_display = ("series_instance_uid", "study", "series_number", "modality", "series_description", "number_of_series_related_instances")
    list_select_related = ("study",)
    search_fields = ("=series_instance_uid", "=study__study_instance_uid", "series_description")
    list_filter = ("modality",)


@admin.register(Instance)
class InstanceAdmin(ReadOnlyAdmin):
    list_display = ("sop_instance_uid", "instance_number", "sop_class_uid", "transfer_syntax_uid", "file_size", "created")
    list_select_related = ("series",)
    search_fields = ("=sop_instance_uid", "=series__series_instance_uid", "=series__study__study_instance_uid")
    list_filter = ("series__modality", "transfer_syntax_uid")
    exclude = ("metadata",)
    readonly_fields = ("header_json",)

    @admin.display(description="Header (DICOM JSON)")
    def header_json(self, obj: Instance) -> str:
        return json.dumps(obj.metadata, indent=1, ensure_ascii=False)[:20000]


# Seconds each C-ECHO of the admin action may take; the nodes are verified in parallel.
ECHO_TIMEOUT = 5.0
ECHO_PARALLEL = 8


@admin.register(RemoteNode)
class RemoteNodeAdmin(admin.ModelAdmin):
    list_display = ("name", "ae_title", "host", "port", "may_store", "may_query", "may_retrieve")
    search_fields = ("name", "ae_title", "host")
    list_filter = ("may_store", "may_query", "may_retrieve")
    readonly_fields = ("created", "updated")
    fieldsets = (
        (None, {"fields": ("name", "description")}),
        ("Connection", {"fields": ("ae_title", "host", "port")}),
        ("May", {"fields": ("may_store", "may_query", "may_retrieve", "access_labels")}),
        (None, {"fields": ("created", "updated")}),
    )
    filter_horizontal = ("access_labels",)
    actions = ["verify_with_c_echo"]

    @admin.action(description="Verify with C-ECHO")
    def verify_with_c_echo(self, request: HttpRequest, queryset: QuerySet[RemoteNode]) -> None:
        """Send a C-ECHO (PS3.4 Annex A) to each selected node, as PACS_AE_TITLE, and say
        how each went: a success message or an error message naming the node."""
        nodes = list(queryset)
        if not nodes:
            return

        def run(node: RemoteNode) -> tuple[bool, str]:
            return echo.verify(node.ae_title, node.host, node.port, settings.PACS_AE_TITLE, timeout=ECHO_TIMEOUT)

        with ThreadPoolExecutor(max_workers=min(ECHO_PARALLEL, len(nodes))) as pool:
            results = list(pool.map(run, nodes))
        for node, (ok, text) in zip(nodes, results):
            if ok:
                self.message_user(request, f"{node} is reachable: {text}.", messages.SUCCESS)
            else:
                self.message_user(request, f"{node} could not be verified: {text}.", messages.ERROR)


class LabelRuleInline(admin.TabularInline):
    model = LabelRule
    extra = 1
    fields = ("attribute", "pattern", "active")


@admin.register(AccessLabel)
class AccessLabelAdmin(admin.ModelAdmin):
    """Scopes of studies: the groups that hold a label see its studies; rules label arrivals."""

    list_display = ("name", "description", "group_names", "rule_count")
    search_fields = ("name",)
    filter_horizontal = ("groups",)
    inlines = [LabelRuleInline]

    @admin.display(description="groups")
    def group_names(self, label: AccessLabel) -> str:
        return ", ".join(label.groups.values_list("name", flat=True))

    @admin.display(description="rules")
    def rule_count(self, label: AccessLabel) -> int:
        return label.rules.count()


@admin.register(LabelRule)
class LabelRuleAdmin(admin.ModelAdmin):
    list_display = ("label", "attribute", "pattern", "active")
    list_filter = ("attribute", "active", "label")
