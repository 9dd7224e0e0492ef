"""The archive's data model: Patient, Study, Series and Instance mirror the DICOM
information model (PS3.3 A.1.2), keyed by their UIDs, with the attributes queries match on
as indexed columns (field names are DICOM keywords in snake_case). RemoteNode is another DICOM
node and what it may do."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class Patient(models.Model):
    """A patient, identified by PatientID within IssuerOfPatientID."""

    patient_id = models.CharField("Patient ID", max_length=64, blank=True)
    issuer_of_patient_id = models.CharField("Issuer of Patient ID", max_length=64, blank=True)
    patient_name = models.CharField("Patient's Name", max_length=324, blank=True)
    # Case- and accent-folded name (archive.dicom.normalize_name), for prefix matching.
    patient_name_norm = models.CharField(max_length=324, blank=True, editable=False)
    patient_birth_date = models.DateField("Birth date", null=True, blank=True)
    patient_sex = models.CharField("Sex", max_length=16, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["patient_id", "issuer_of_patient_id"], name="patient_unique_id_issuer")
        ]
        indexes = [
            models.Index(fields=["patient_id"], name="patient_id_idx"),
            # varchar_pattern_ops lets PostgreSQL use the index for LIKE 'prefix%' in any
            # collation; other databases ignore the operator class.
            models.Index(fields=["patient_name_norm"], name="patient_name_norm_idx", opclasses=["varchar_pattern_ops"]),
        ]

    def __str__(self) -> str:
        return f"{self.patient_name or '(no name)'} [{self.patient_id}]"


class Study(models.Model):
    """A study (PS3.3 C.7.2.1), with counts kept exact as instances arrive."""

    class Status(models.TextChoices):
        SCHEDULED = "SCHEDULED", "Scheduled"
        ARRIVED = "ARRIVED", "Arrived"
        STARTED = "STARTED", "Reading started"
        READ = "READ", "Read"
        VERIFIED = "VERIFIED", "Verified"
        CANCELLED = "CANCELLED", "Cancelled"

    class Priority(models.TextChoices):
        STAT = "STAT", "STAT"
        HIGH = "HIGH", "High"
        ROUTINE = "ROUTINE", "Routine"
        LOW = "LOW", "Low"

    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="studies")
    study_instance_uid = models.CharField("Study Instance UID", max_length=64, unique=True)
    accession_number = models.CharField("Accession", max_length=16, blank=True, db_index=True)
    study_date = models.DateField(null=True, blank=True, db_index=True)
    study_time = models.TimeField(null=True, blank=True)
    study_description = models.CharField(max_length=64, blank=True)
    referring_physician_name = models.CharField(max_length=324, blank=True)
    study_id = models.CharField("Study ID", max_length=16, blank=True)
    institution_name = models.CharField(max_length=64, blank=True)
    modalities_in_study = models.CharField(max_length=256, blank=True)
    number_of_study_related_series = models.PositiveIntegerField("Series", default=0)
    number_of_study_related_instances = models.PositiveIntegerField("Instances", default=0)
    study_size = models.PositiveBigIntegerField("Size (bytes)", default=0)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ARRIVED, db_index=True)
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.ROUTINE)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    access_labels = models.ManyToManyField(
        "AccessLabel",
        blank=True,
        related_name="studies",
        help_text="Who may see the study besides those who see every study: the labels' groups.",
    )

    class Meta:
        verbose_name_plural = "studies"
        indexes = [models.Index(fields=["study_date", "study_time"], name="study_date_time_idx")]
        permissions = [
            ("view_all_studies", "Can see every study, whatever its access labels"),
            ("view_images", "Can see images (pixel data) of the studies in scope"),
            ("download_study", "Can download and export the studies in scope"),
            ("import_study", "Can import and upload instances"),
            ("change_study_status", "Can change the status and priority of a study"),
            ("correct_demographics", "Can correct patient and study demographics"),
        ]

    def __str__(self) -> str:
        return f"{self.study_date or '????-??-??'} {self.study_description or self.study_instance_uid}"


class Series(models.Model):
    """A series (PS3.3 C.7.3.1)."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField("Series Instance UID", max_length=64, unique=True)
    series_number = models.IntegerField(null=True, blank=True)
    modality = models.CharField(max_length=16, blank=True, db_index=True)
    series_description = models.CharField(max_length=64, blank=True)
    body_part_examined = models.CharField(max_length=16, blank=True)
    protocol_name = models.CharField(max_length=64, blank=True)
    series_date = models.DateField(null=True, blank=True)
    series_time = models.TimeField(null=True, blank=True)
    station_name = models.CharField(max_length=16, blank=True)
    number_of_series_related_instances = models.PositiveIntegerField("Instances", default=0)
    series_size = models.PositiveBigIntegerField("Size (bytes)", default=0)
    # The calling AE title that first sent this series (empty for imports and uploads).
    source_ae_title = models.CharField(max_length=16, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"{self.modality} #{self.series_number} {self.series_description}".strip()


class Instance(models.Model):
    """A stored SOP instance and its Part 10 file under PACS_STORAGE_DIR."""

    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances", db_index=False)
    sop_instance_uid = models.CharField("SOP Instance UID", max_length=64, unique=True)
    sop_class_uid = models.CharField("SOP Class UID", max_length=64, db_index=True)
    instance_number = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    bits_allocated = models.PositiveSmallIntegerField(null=True, blank=True)
    number_of_frames = models.PositiveIntegerField(null=True, blank=True)
    image_position_patient = models.JSONField(null=True, blank=True)
    image_orientation_patient = models.JSONField(null=True, blank=True)
    slice_location = models.FloatField(null=True, blank=True)
    specific_character_set = models.CharField(max_length=64, blank=True)
    # Relative to PACS_STORAGE_DIR; derived from a hash of the SOP Instance UID.
    file_path = models.CharField(max_length=255, unique=True)
    file_size = models.PositiveBigIntegerField()
    file_sha256 = models.CharField("File SHA-256", max_length=64)
    # The header without bulk data, in the DICOM JSON model (PS3.18 F.2).
    metadata = models.JSONField(default=dict)
    source_ae_title = models.CharField(max_length=16, blank=True)
    source_address = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["series", "instance_number"], name="instance_series_number_idx")]

    def __str__(self) -> str:
        return f"#{self.instance_number} {self.sop_instance_uid}"


def validate_ae_title(value: str) -> None:
    """Check that ``value`` is a valid Application Entity title (PS3.5 6.2, VR AE): 1 to 16
    characters of the default character repertoire (ASCII), no backslash, no control
    characters, and not only spaces (leading and trailing spaces are not significant).

    Raises ValidationError.
    """
    if not value.strip():
        raise ValidationError("An AE title must not be empty or only spaces.", code="ae_title_empty")
    if len(value) > 16:
        raise ValidationError("An AE title has at most 16 characters.", code="ae_title_too_long")
    if "\\" in value:
        raise ValidationError("An AE title must not contain a backslash.", code="ae_title_backslash")
    if any(ord(char) < 0x20 or ord(char) > 0x7E for char in value):
        raise ValidationError(
            "An AE title must be printable ASCII (no control or non-ASCII characters).", code="ae_title_characters"
        )


class RemoteNode(models.Model):
    """Another DICOM application entity (PS3.7 7.1, PS3.8 9.3.2) known to the archive, and
    what it may do: send us instances (C-STORE), query (C-FIND), retrieve (C-MOVE, C-GET),
    the last also making it a valid C-MOVE destination (its AE title maps to host:port)."""

    name = models.CharField(
        max_length=64,
        unique=True,
        help_text="A human label, e.g. “CT scanner, room 2”.",
        error_messages={"unique": "A remote node with this name already exists."},
    )
    ae_title = models.CharField(
        "AE title",
        max_length=16,
        unique=True,
        validators=[validate_ae_title],
        help_text="Its Application Entity title: 1 to 16 ASCII characters, case-sensitive.",
        error_messages={"unique": "A remote node with this AE title already exists."},
    )
    host = models.CharField(max_length=255, help_text="Host name or IP address.")
    port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    may_store = models.BooleanField("may store", default=True, help_text="May send us instances (C-STORE).")
    may_query = models.BooleanField("may query", default=True, help_text="May query the archive (C-FIND).")
    may_retrieve = models.BooleanField(
        "may retrieve",
        default=True,
        help_text="May retrieve from the archive (C-MOVE, C-GET) and is a valid C-MOVE destination.",
    )
    access_labels = models.ManyToManyField(
        "AccessLabel",
        blank=True,
        related_name="nodes",
        help_text="When set, the node queries and retrieves only the studies carrying one of these labels.",
    )
    description = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "remote node"

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    def clean(self) -> None:
        """Strip the AE title and host (spaces around an AE title are not significant, PS3.5 6.2)."""
        self.ae_title = self.ae_title.strip()
        self.host = self.host.strip()

    @property
    def rights(self) -> list[str]:
        """The services it may use, e.g. ["store", "query", "retrieve"]."""
        return [right for right in ("store", "query", "retrieve") if getattr(self, f"may_{right}")]


class AccessLabel(models.Model):
    """A scope of studies (a department, a site): the groups holding it see its studies."""

    name = models.CharField(max_length=64, unique=True, help_text="e.g. “Cardiology” or “Site North”.")
    description = models.TextField(blank=True)
    groups = models.ManyToManyField(
        "auth.Group", blank=True, related_name="access_labels", help_text="Members of these groups see the labelled studies."
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class LabelRule(models.Model):
    """Gives a label to arriving studies whose attribute matches a pattern (``*`` and ``?``)."""

    class Attribute(models.TextChoices):
        CALLING_AE = "calling_ae", "calling AE title (the sender)"
        INSTITUTION = "institution_name", "Institution Name"
        REFERRING = "referring_physician_name", "Referring Physician's Name"

    label = models.ForeignKey(AccessLabel, on_delete=models.CASCADE, related_name="rules")
    attribute = models.CharField(max_length=32, choices=Attribute.choices)
    pattern = models.CharField(
        max_length=324, help_text="Matched case-insensitively; * matches any characters, ? one character."
    )
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["label__name", "attribute", "pattern"]

    def __str__(self) -> str:
        return f"{self.get_attribute_display()} matches {self.pattern!r} → {self.label}"


class SendJob(models.Model):
    """A study or series sent to a DICOM node by C-STORE (a django-q2 task), and how it went."""

    class State(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        DONE = "done", "done"
        FAILED = "failed", "failed"

    node = models.ForeignKey(RemoteNode, on_delete=models.CASCADE, related_name="send_jobs")
    study = models.ForeignKey(Study, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    series = models.ForeignKey(Series, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    requested_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    total = models.PositiveIntegerField(default=0)
    sent = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-pk"]

    def __str__(self) -> str:
        return f"send #{self.pk} to {self.node.ae_title}: {self.state}"
