"""Django admin for the archive: searchable and filterable, read-only (archive data only
changes through the ingest service and deliberate actions)."""

from __future__ import annotations

import json

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from archive.models import Instance, Patient, Series, Study


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
    list_filter = (ModalityFilter, "study_date", "status", "priority")
    date_hierarchy = "study_date"
    inlines = [SeriesInline]


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
