"""Audit events that come from Django itself: sign-in, sign-out, failed sign-in and lockout
(django-axes), and the changes made in admin to users, roles, access labels and DICOM nodes."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import post_save
from django.dispatch import receiver

from audit.services import record

# Admin changes to these models are security changes (app_label.model -> action).
SECURITY_MODELS = {
    "auth.user": "permission-change",
    "auth.group": "permission-change",
    "archive.accesslabel": "permission-change",
    "archive.labelrule": "permission-change",
    "archive.remotenode": "node-change",
    "archive.study": "modify",
    "archive.patient": "modify",
    "axes.accessattempt": "permission-change",
}
_VERBS = {ADDITION: "added", CHANGE: "changed", DELETION: "deleted"}


@receiver(user_logged_in, dispatch_uid="audit.login")
def on_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    record("login", channel=_channel(request), request=request, user=user)


@receiver(user_logged_out, dispatch_uid="audit.logout")
def on_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        record("logout", channel=_channel(request), request=request, user=user)


@receiver(user_login_failed, dispatch_uid="audit.login_failed")
def on_login_failed(sender: Any, credentials: dict, request: Any = None, **kwargs: Any) -> None:
    record(
        "login-failed",
        channel=_channel(request),
        request=request,
        actor=str(credentials.get("username", ""))[:150] or "(no user name)",
        outcome="failure",
    )


def on_locked_out(sender: Any, request: Any, username: str | None = None, ip_address: str | None = None, **kwargs: Any) -> None:
    record(
        "login-failed",
        channel=_channel(request),
        request=request,
        actor=(username or "(no user name)")[:150],
        outcome="denied",
        details={"locked_out": True},
    )


@receiver(post_save, sender=LogEntry, dispatch_uid="audit.admin_change")
def on_admin_change(sender: Any, instance: LogEntry, created: bool, **kwargs: Any) -> None:
    if not created or instance.content_type is None:
        return
    key = f"{instance.content_type.app_label}.{instance.content_type.model}"
    action = SECURITY_MODELS.get(key)
    if action is None:
        return
    record(
        action,
        channel="admin",
        user=instance.user,
        details={
            "object": key,
            "id": instance.object_id,
            "repr": instance.object_repr,
            "change": _VERBS.get(instance.action_flag, ""),
            "message": instance.get_change_message(),
        },
    )


def _channel(request: Any) -> str:
    path = getattr(request, "path", "") or ""
    if path.startswith("/admin/"):
        return "admin"
    if path.startswith("/api/"):
        return "api"
    return "web"
