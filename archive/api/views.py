"""The REST API for the RIS and integrators (``/api/``), on the archive's services.

Every list and object is narrowed by the access service; filters on DICOM attributes go
through the query engine (``?PatientName=doe*&StudyDate=20240101-20240131``) with the same
matching as C-FIND and QIDO-RS; each access writes one audit event.
"""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import FileResponse
from django_filters.rest_framework import DjangoFilterBackend
from django_q.tasks import async_task
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.filters import BaseFilterBackend, OrderingFilter
from rest_framework.request import Request
from rest_framework.response import Response

import audit
from archive import access, deletion, query, storage
from archive.api import serializers as s
from archive.models import AccessLabel, Instance, Patient, RemoteNode, SendJob, Series, Study

UID_REGEX = r"[0-9.]{1,64}"
ERRORS = {
    400: OpenApiResponse(description="Invalid parameters or body; the answer names the fields."),
    401: OpenApiResponse(description="No or bad credentials (Token or session)."),
    403: OpenApiResponse(description="The user's roles do not allow this."),
    404: OpenApiResponse(description="No such object, or out of the user's scope."),
}


class DicomQueryFilter(BaseFilterBackend):
    """Filters named by DICOM keywords, matched by the query engine (PS3.4 C.2.2.2)."""

    def keys(self, request: Request, level: str) -> dict[str, str]:
        keys = {}
        for name, value in request.query_params.items():
            attribute = query.ATTRIBUTES.get(name)
            if attribute is None or attribute.keyword in query.RETURN_ONLY or value == "":
                continue
            if query.level_index(attribute.level) > query.level_index(level):
                continue
            keys[name] = value
        return keys

    def filter_queryset(self, request: Request, queryset: QuerySet, view) -> QuerySet:
        keys = self.keys(request, view.query_level)
        if not keys:
            return queryset
        try:
            return query.plan_query(view.query_level, keys).queryset(queryset)
        except query.QueryError as exc:
            raise ValidationError({"query": [str(exc)]}) from None

    def get_schema_operation_parameters(self, view) -> list[dict]:
        level = getattr(view, "query_level", "STUDY")
        return [
            {
                "name": attribute.keyword,
                "required": False,
                "in": "query",
                "description": f"DICOM {attribute.keyword} ({attribute.vr}): single value, * and ? wildcards"
                + (", ranges" if attribute.vr in ("DA", "TM") else "")
                + (", a list of UIDs separated by backslashes" if attribute.vr == "UI" else ""),
                "schema": {"type": "string"},
            }
            for attribute in query.ATTRIBUTES.values()
            if attribute.keyword not in query.RETURN_ONLY and query.level_index(attribute.level) <= query.level_index(level)
        ]


class ModelPermissionsWithView(permissions.DjangoModelPermissions):
    """Django's model permissions, reading included (``view_<model>``)."""

    perms_map = {**permissions.DjangoModelPermissions.perms_map, "GET": ["%(app_label)s.view_%(model_name)s"],
                 "HEAD": ["%(app_label)s.view_%(model_name)s"]}


def _audit(request: Request, action_name: str, study: Study | None = None, **details) -> None:
    audit.record(
        action_name,
        channel="api",
        request=request._request,
        user=request.user,
        patient_id=study.patient.patient_id if study else "",
        study_instance_uid=study.study_instance_uid if study else "",
        details=details,
    )


class ArchiveViewSet(viewsets.GenericViewSet):
    """Lists filtered by DICOM keywords, django-filter fields and ordering; one audit event each."""

    filter_backends = [DicomQueryFilter, DjangoFilterBackend, OrderingFilter]
    query_level = "STUDY"

    def list(self, request: Request, *args, **kwargs) -> Response:
        response = mixins.ListModelMixin.list(self, request, *args, **kwargs)
        _audit(request, "query", level=self.query_level, filters=dict(request.query_params.items()),
               matches=response.data.get("count") if isinstance(response.data, dict) else None)
        return response


@extend_schema_view(
    list=extend_schema(summary="Search patients", responses={200: s.PatientSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(summary="A patient", responses={200: s.PatientSerializer, **ERRORS}),
)
class PatientViewSet(mixins.RetrieveModelMixin, ArchiveViewSet):
    serializer_class = s.PatientSerializer
    query_level = "PATIENT"
    ordering_fields = ["patient_name", "patient_id", "patient_birth_date"]
    ordering = ["patient_name"]

    def get_queryset(self) -> QuerySet[Patient]:
        return access.patients_for(self.request.user)


@extend_schema_view(
    list=extend_schema(summary="Search studies", responses={200: s.StudySerializer(many=True), **ERRORS}),
    retrieve=extend_schema(summary="A study", responses={200: s.StudySerializer, **ERRORS}),
    partial_update=extend_schema(summary="Change a study's status and priority (RIS)", request=s.StudyStatusSerializer,
                                 responses={200: s.StudySerializer, **ERRORS}),
    destroy=extend_schema(summary="Delete a study: its files and rows (Administrator)", responses={204: None, **ERRORS}),
)
class StudyViewSet(mixins.RetrieveModelMixin, mixins.UpdateModelMixin, mixins.DestroyModelMixin, ArchiveViewSet):
    serializer_class = s.StudySerializer
    lookup_field = "study_instance_uid"
    lookup_value_regex = UID_REGEX
    query_level = "STUDY"
    filterset_fields = ["status", "priority"]
    ordering_fields = ["study_date", "accession_number", "patient__patient_name", "number_of_study_related_instances", "created"]
    ordering = ["-study_date", "-pk"]
    http_method_names = ["get", "patch", "delete", "post", "head", "options"]

    def get_queryset(self) -> QuerySet[Study]:
        return access.studies_for(self.request.user).select_related("patient").prefetch_related("access_labels")

    def get_serializer_class(self):
        if self.action == "partial_update":
            return s.StudyStatusSerializer
        return super().get_serializer_class()

    def retrieve(self, request: Request, *args, **kwargs) -> Response:
        study = self.get_object()
        _audit(request, "study-view", study)
        return Response(s.StudySerializer(study).data)

    def partial_update(self, request: Request, *args, **kwargs) -> Response:
        study = self.get_object()
        if not access.may(request.user, "change"):
            raise PermissionDenied("Changing a study's status needs the change_study_status permission.")
        serializer = s.StudyStatusSerializer(study, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        before = {"status": study.status, "priority": study.priority}
        serializer.save()
        _audit(request, "modify", study, before=before, after=serializer.data)
        return Response(s.StudySerializer(study).data)

    def destroy(self, request: Request, *args, **kwargs) -> Response:
        study = self.get_object()
        if not access.has(request.user, "archive.delete_study"):
            raise PermissionDenied("Deleting studies is for administrators.")
        removed = deletion.delete_study(study)
        _audit(request, "delete", study, instances=removed)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="Set a study's access labels by hand (Administrator)", request=s.StudyLabelsSerializer,
                   responses={200: s.StudySerializer, **ERRORS})
    @action(detail=True, methods=["patch"])
    def labels(self, request: Request, study_instance_uid: str) -> Response:
        study = self.get_object()
        if not access.has(request.user, "archive.change_study"):
            raise PermissionDenied("Setting access labels needs the change_study permission.")
        serializer = s.StudyLabelsSerializer(study, data=request.data)
        serializer.is_valid(raise_exception=True)
        serializer.save()
        _audit(request, "permission-change", study, access_labels=serializer.data["access_labels"])
        return Response(s.StudySerializer(study).data)

    @extend_schema(summary="Send the study to a DICOM node (a queued task)", request=s.SendRequestSerializer,
                   responses={202: s.SendJobSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def send(self, request: Request, study_instance_uid: str) -> Response:
        return _queue_send(request, study=self.get_object())


def _queue_send(request: Request, study: Study | None = None, series: Series | None = None) -> Response:
    if not access.may(request.user, "download"):
        raise PermissionDenied("Sending studies needs the download_study permission.")
    serializer = s.SendRequestSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    node = serializer.validated_data["node"]
    if not node.may_retrieve:
        raise ValidationError({"node": [f"{node.name} is not a destination (its retrieve right is off)."]})
    job = SendJob.objects.create(node=node, study=study or series.study, series=series, requested_by=request.user)
    async_task("archive.tasks.send_job", job.pk, group="send", task_name=f"send-{job.pk}")
    _audit(request, "export", study or series.study, node=node.ae_title, series=series.series_instance_uid if series else "")
    job.refresh_from_db()
    return Response(s.SendJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(summary="Search series", responses={200: s.SeriesSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(summary="A series", responses={200: s.SeriesSerializer, **ERRORS}),
    destroy=extend_schema(summary="Delete a series: its files and rows (Administrator)", responses={204: None, **ERRORS}),
)
class SeriesViewSet(mixins.RetrieveModelMixin, mixins.DestroyModelMixin, ArchiveViewSet):
    serializer_class = s.SeriesSerializer
    lookup_field = "series_instance_uid"
    lookup_value_regex = UID_REGEX
    query_level = "SERIES"
    ordering_fields = ["series_number", "modality", "created"]
    ordering = ["study_id", "series_number", "pk"]

    def get_queryset(self) -> QuerySet[Series]:
        return access.series_for(self.request.user).select_related("study__patient")

    def destroy(self, request: Request, *args, **kwargs) -> Response:
        series = self.get_object()
        if not access.has(request.user, "archive.delete_series"):
            raise PermissionDenied("Deleting series is for administrators.")
        study = series.study
        removed = deletion.delete_series(series)
        _audit(request, "delete", study, series=series.series_instance_uid, instances=removed)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="Send the series to a DICOM node (a queued task)", request=s.SendRequestSerializer,
                   responses={202: s.SendJobSerializer, **ERRORS})
    @action(detail=True, methods=["post"])
    def send(self, request: Request, series_instance_uid: str) -> Response:
        return _queue_send(request, series=self.get_object())


@extend_schema_view(
    list=extend_schema(summary="Search instances", responses={200: s.InstanceSerializer(many=True), **ERRORS}),
    retrieve=extend_schema(summary="An instance", responses={200: s.InstanceSerializer, **ERRORS}),
)
class InstanceViewSet(mixins.RetrieveModelMixin, ArchiveViewSet):
    serializer_class = s.InstanceSerializer
    lookup_field = "sop_instance_uid"
    lookup_value_regex = UID_REGEX
    query_level = "IMAGE"
    ordering_fields = ["instance_number", "created"]
    ordering = ["series_id", "instance_number", "pk"]

    def get_queryset(self) -> QuerySet[Instance]:
        return access.instances_for(self.request.user, "view").select_related("series__study__patient")

    @extend_schema(summary="Download the instance's DICOM file (needs download_study)",
                   responses={(200, "application/dicom"): OpenApiTypes.BINARY, **ERRORS})
    @action(detail=True, methods=["get"])
    def file(self, request: Request, sop_instance_uid: str) -> FileResponse:
        instance = self.get_object()
        if not access.may(request.user, "download"):
            raise PermissionDenied("Downloading files needs the download_study permission.")
        _audit(request, "export", instance.series.study, instance=sop_instance_uid)
        return FileResponse(
            open(storage.absolute(instance.file_path), "rb"),
            content_type="application/dicom",
            as_attachment=True,
            filename=f"{instance.pk}.dcm",
        )


class AuditedModelViewSet(viewsets.ModelViewSet):
    """Administration of a model, each change written to the audit log as ``audit_action``,
    naming the object by its ``audit_field`` under ``audit_key`` (labels and nodes are
    security settings)."""

    permission_classes = [permissions.IsAuthenticated, ModelPermissionsWithView]
    audit_action = ""
    audit_field = ""
    audit_key = ""

    def _audit_change(self, value: str, change: str) -> None:
        _audit(self.request, self.audit_action, **{self.audit_key: value, "change": change})

    def perform_create(self, serializer) -> None:
        serializer.save()
        self._audit_change(serializer.data[self.audit_field], "added")

    def perform_update(self, serializer) -> None:
        serializer.save()
        self._audit_change(serializer.data[self.audit_field], "changed")

    def perform_destroy(self, instance) -> None:
        self._audit_change(getattr(instance, self.audit_field), "deleted")
        instance.delete()


@extend_schema_view(list=extend_schema(summary="Access labels"), create=extend_schema(summary="Add an access label"))
class AccessLabelViewSet(AuditedModelViewSet):
    serializer_class = s.AccessLabelSerializer
    queryset = AccessLabel.objects.prefetch_related("groups")
    filter_backends = [OrderingFilter]
    ordering = ["name"]
    audit_action, audit_field, audit_key = "permission-change", "name", "label"


@extend_schema_view(list=extend_schema(summary="DICOM nodes"), create=extend_schema(summary="Declare a DICOM node"))
class RemoteNodeViewSet(AuditedModelViewSet):
    serializer_class = s.RemoteNodeSerializer
    queryset = RemoteNode.objects.prefetch_related("access_labels")
    filter_backends = [DjangoFilterBackend, OrderingFilter]
    filterset_fields = ["ae_title", "may_store", "may_query", "may_retrieve"]
    ordering = ["name"]
    audit_action, audit_field, audit_key = "node-change", "ae_title", "node"


@extend_schema_view(
    list=extend_schema(summary="Sends to DICOM nodes and their progress"),
    retrieve=extend_schema(summary="One send and its progress", parameters=[OpenApiParameter("id", int, "path")]),
)
class SendJobViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = s.SendJobSerializer
    filter_backends = [DjangoFilterBackend, OrderingFilter]
    filterset_fields = ["state"]
    ordering = ["-pk"]

    def get_queryset(self) -> QuerySet[SendJob]:
        jobs = SendJob.objects.select_related("node", "study", "series")
        if getattr(self, "swagger_fake_view", False):
            return jobs.none()
        if access.has(self.request.user, "archive.view_all_studies") and self.request.user.is_staff:
            return jobs
        return jobs.filter(requested_by=self.request.user)
