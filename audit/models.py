"""The audit log: one append-only, hash-chained row per access to patient data.

Rows are only ever added, by ``audit.record``. The ORM refuses to update or delete them, and
the database does too (a trigger on PostgreSQL and SQLite, see the migrations). Each row's
``hash`` covers its content and the previous row's hash, so that a changed, removed or
inserted row breaks the chain; ``manage.py verifyaudit`` walks it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.conf import settings
from django.db import models


class AppendOnlyError(Exception):
    """An attempt to change or remove an audit event."""


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyError("audit events are append-only: they cannot be updated")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("audit events are append-only: they cannot be deleted")

    def _raw_delete(self, using: str) -> int:
        raise AppendOnlyError("audit events are append-only: they cannot be deleted")


class AuditEvent(models.Model):
    """Who did what to which patient's data, from where, with what outcome."""

    class Action(models.TextChoices):
        LOGIN = "login", "login"
        LOGIN_FAILED = "login-failed", "failed login"
        LOGOUT = "logout", "logout"
        QUERY = "query", "search / query"
        STUDY_VIEW = "study-view", "study view"
        RETRIEVE = "retrieve", "image retrieve"
        EXPORT = "export", "download / export"
        STORE = "store", "store"
        DELETE = "delete", "delete"
        MODIFY = "modify", "modify"
        PERMISSION_CHANGE = "permission-change", "permission or user change"
        NODE_CHANGE = "node-change", "DICOM node change"
        AUDIT_EXPORT = "audit-export", "audit log export"

    class Outcome(models.TextChoices):
        SUCCESS = "success", "success"
        DENIED = "denied", "denied"
        FAILURE = "failure", "failure"

    class Channel(models.TextChoices):
        WEB = "web", "web"
        API = "api", "REST API"
        DICOMWEB = "dicomweb", "DICOMweb"
        DIMSE = "dimse", "DIMSE"
        ADMIN = "admin", "admin"
        SYSTEM = "system", "system"

    time = models.DateTimeField(db_index=True)
    # No foreign key constraint: removing a user must not touch their trail.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    actor = models.CharField(max_length=150, help_text="user name, or the calling AE title for DIMSE", db_index=True)
    role = models.CharField(max_length=200, blank=True, help_text="the actor's groups at the time")
    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.SUCCESS)
    patient_id = models.CharField("Patient ID", max_length=64, blank=True, db_index=True)
    study_instance_uid = models.CharField("Study Instance UID", max_length=64, blank=True, db_index=True)
    source_address = models.CharField(max_length=64, blank=True)
    user_agent = models.CharField(max_length=256, blank=True)
    details = models.JSONField(default=dict, blank=True)
    previous_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-pk"]
        indexes = [models.Index(fields=["action", "time"], name="audit_action_time_idx")]

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.outcome}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None or kwargs.get("force_update"):
            raise AppendOnlyError("audit events are append-only: they cannot be updated")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("audit events are append-only: they cannot be deleted")

    def content(self) -> dict[str, Any]:
        """The fields the hash covers, in a canonical form."""
        return {
            "time": self.time.isoformat(),
            "user": self.user_id,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "channel": self.channel,
            "outcome": self.outcome,
            "patient_id": self.patient_id,
            "study_instance_uid": self.study_instance_uid,
            "source_address": self.source_address,
            "user_agent": self.user_agent,
            "details": self.details,
        }

    def body(self) -> str:
        """The canonical JSON text of ``content()`` that the hash covers."""
        return json.dumps(self.content(), sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)

    def compute_hash(self, previous_hash: str) -> str:
        """SHA-256 (hex) of the previous hash, a newline and this event's canonical body (UTF-8)."""
        return hashlib.sha256((previous_hash + "\n" + self.body()).encode()).hexdigest()
