"""REST API representations of the archive."""

from __future__ import annotations

from django.contrib.auth.models import Group
from rest_framework import serializers

from archive.models import AccessLabel, Instance, Patient, RemoteNode, SendJob, Series, Study


class PatientSerializer(serializers.ModelSerializer):
    class Meta:
        model = Patient
        fields = ["id", "patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date", "patient_sex"]


class StudySerializer(serializers.ModelSerializer):
    patient = PatientSerializer(read_only=True)
    access_labels = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Study
        fields = [
            "id", "study_instance_uid", "patient", "accession_number", "study_date", "study_time", "study_description",
            "referring_physician_name", "study_id", "institution_name", "modalities_in_study",
            "number_of_study_related_series", "number_of_study_related_instances", "study_size", "status", "priority",
            "access_labels", "created", "updated",
        ]
        read_only_fields = [f for f in fields if f not in ("status", "priority")]


class StudyStatusSerializer(serializers.ModelSerializer):
    """What the RIS changes on a study: its reading status and priority."""

    class Meta:
        model = Study
        fields = ["status", "priority"]


class StudyLabelsSerializer(serializers.ModelSerializer):
    access_labels = serializers.SlugRelatedField(slug_field="name", many=True, queryset=AccessLabel.objects.all())

    class Meta:
        model = Study
        fields = ["access_labels"]


class SeriesSerializer(serializers.ModelSerializer):
    study_instance_uid = serializers.CharField(source="study.study_instance_uid", read_only=True)

    class Meta:
        model = Series
        fields = [
            "id", "series_instance_uid", "study_instance_uid", "series_number", "modality", "series_description",
            "body_part_examined", "protocol_name", "series_date", "series_time", "station_name",
            "number_of_series_related_instances", "series_size", "source_ae_title", "created",
        ]


class InstanceSerializer(serializers.ModelSerializer):
    series_instance_uid = serializers.CharField(source="series.series_instance_uid", read_only=True)

    class Meta:
        model = Instance
        fields = [
            "id", "sop_instance_uid", "sop_class_uid", "series_instance_uid", "instance_number", "transfer_syntax_uid",
            "rows", "columns", "bits_allocated", "number_of_frames", "file_size", "file_sha256", "created",
        ]


class AccessLabelSerializer(serializers.ModelSerializer):
    groups = serializers.SlugRelatedField(slug_field="name", many=True, required=False, queryset=Group.objects.all())

    class Meta:
        model = AccessLabel
        fields = ["id", "name", "description", "groups"]


class RemoteNodeSerializer(serializers.ModelSerializer):
    access_labels = serializers.SlugRelatedField(slug_field="name", many=True, required=False, queryset=AccessLabel.objects.all())

    class Meta:
        model = RemoteNode
        fields = ["id", "name", "ae_title", "host", "port", "may_store", "may_query", "may_retrieve", "access_labels", "description"]


class SendRequestSerializer(serializers.Serializer):
    node = serializers.SlugRelatedField(slug_field="name", queryset=RemoteNode.objects.all(),
                                        help_text="The name of the DICOM node to send to.")


class SendJobSerializer(serializers.ModelSerializer):
    node = serializers.SlugRelatedField(slug_field="name", read_only=True)
    study_instance_uid = serializers.CharField(source="study.study_instance_uid", read_only=True, default=None)
    series_instance_uid = serializers.CharField(source="series.series_instance_uid", read_only=True, default=None)

    class Meta:
        model = SendJob
        fields = ["id", "node", "study_instance_uid", "series_instance_uid", "state", "total", "sent", "failed", "error",
                  "created", "finished"]
