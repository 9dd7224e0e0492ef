"""The access service: which patients and studies a user or a DICOM node may see, send or change.

Every channel narrows its rows through these functions before it reads: the web pages, the
REST API and DICOMweb (users), and the DIMSE handlers (nodes). A study out of scope is
treated as absent: a 404 on the web, missing from search answers, not retrieved.

Users (roles are Django groups, see ARCHITECTURE.md):

* ``view``: searching and seeing study information needs ``archive.view_study``;
* ``images``: pixel data (viewer, thumbnails, renditions) needs ``archive.view_images`` too;
* ``download``: files needs ``archive.download_study``;
* scope: ``archive.view_all_studies`` sees every study; otherwise the studies carrying an
  access label held by one of the user's groups, and, when PACS_REFERRING_PHYSICIAN_SCOPE is
  on, those whose Referring Physician's Name is the user's (``Last^First``).

Nodes: a declared RemoteNode's rights (``may_store``, ``may_query``, ``may_retrieve``) apply
to its AE title; its access labels, when it has any, narrow what it queries and retrieves.
An undeclared AE may query and retrieve everything unless PACS_QR_KNOWN_NODES_ONLY is on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, OuterRef, Q, QuerySet

from archive.compiled import unrestricted
from archive.dicom import fnmatch_dicom
from archive.models import AccessLabel, Instance, LabelRule, Patient, RemoteNode, Series, Study

User = AbstractBaseUser | AnonymousUser
ACTIONS = {
    "view": ("archive.view_study",),
    "images": ("archive.view_study", "archive.view_images"),
    "download": ("archive.view_study", "archive.download_study"),
    "change": ("archive.view_study", "archive.change_study_status"),
}


PERMISSIONS_SECONDS = 30.0
_permissions: dict[int, tuple[float, frozenset[str]]] = {}
_permissions_lock = threading.Lock()


def permissions_of(user: AbstractBaseUser) -> frozenset[str]:
    """The user's permissions ("app.codename"), read at most every PERMISSIONS_SECONDS.

    An image request would otherwise pay two queries for them; a change of roles takes
    effect within half a minute in every process.
    """
    now = time.monotonic()
    with _permissions_lock:
        cached = _permissions.get(user.pk)
    if cached and now - cached[0] < PERMISSIONS_SECONDS:
        return cached[1]
    found = frozenset(user.get_all_permissions()) if user.is_active else frozenset()
    with _permissions_lock:
        if len(_permissions) > 10_000:
            _permissions.clear()
        _permissions[user.pk] = (now, found)
    return found


def forget_permissions() -> None:
    """Drop the cached permissions (tests, and after role changes in this process)."""
    with _permissions_lock:
        _permissions.clear()


def has(user: User, permission: str) -> bool:
    if not user.is_authenticated or not user.is_active:
        return False
    return user.is_superuser or permission in permissions_of(user)


def may(user: User, action: str) -> bool:
    """Whether ``user``'s roles allow ``action`` at all (on the studies in their scope)."""
    return all(has(user, permission) for permission in ACTIONS[action])


def studies_for(user: User, action: str = "view") -> QuerySet[Study]:
    """The studies ``user`` may ``action`` ("view", "images", "download", "change")."""
    if not may(user, action):
        return Study.objects.none()
    if has(user, "archive.view_all_studies"):
        return unrestricted(Study.objects.all())
    return Study.objects.filter(_scope(user))


def _scope(user: AbstractBaseUser) -> Q:
    labelled = Study.access_labels.through.objects.filter(
        study_id=OuterRef("pk"), accesslabel__groups__in=user.groups.all()
    )
    scope = Q(Exists(labelled))
    if settings.PACS_REFERRING_PHYSICIAN_SCOPE:
        last, first = (user.last_name or "").strip(), (user.first_name or "").strip()
        if last:
            name = f"{last}^{first}" if first else last
            scope |= Q(referring_physician_name__iexact=name) | Q(referring_physician_name__istartswith=name + "^")
    return scope


def series_for(user: User, action: str = "view") -> QuerySet[Series]:
    """The series of the studies ``user`` may ``action``."""
    if not may(user, action):
        return Series.objects.none()
    if has(user, "archive.view_all_studies"):
        return unrestricted(Series.objects.all())
    return Series.objects.filter(study__in=studies_for(user, action))


def instances_for(user: User, action: str = "images") -> QuerySet[Instance]:
    """The instances of the studies ``user`` may ``action`` (pixel data by default)."""
    if not may(user, action):
        return Instance.objects.none()
    if has(user, "archive.view_all_studies"):
        return unrestricted(Instance.objects.all())
    return Instance.objects.filter(series__study__in=studies_for(user, action))


def patients_for(user: User) -> QuerySet[Patient]:
    """The patients with at least one study ``user`` may see."""
    if not may(user, "view"):
        return Patient.objects.none()
    if has(user, "archive.view_all_studies"):
        return unrestricted(Patient.objects.all())
    return Patient.objects.filter(Exists(studies_for(user).filter(patient=OuterRef("pk"))))


# ------------------------------------------------------------------------- DICOM nodes


@dataclass(frozen=True)
class NodeAccess:
    """What a calling AE title may do, read once per association."""

    ae_title: str
    known: bool
    may_store: bool
    may_query: bool
    may_retrieve: bool
    label_ids: tuple[int, ...] = ()

    def may(self, right: str) -> bool:
        return getattr(self, f"may_{right}")

    def studies(self) -> QuerySet[Study]:
        """The studies this node may query and retrieve."""
        if self.label_ids:
            return Study.objects.filter(
                Exists(Study.access_labels.through.objects.filter(study_id=OuterRef("pk"), accesslabel_id__in=self.label_ids))
            )
        return Study.objects.all()

    def scope(self, model: type) -> QuerySet:
        """Rows of ``model`` (Patient, Study, Series or Instance) within the node's studies."""
        if not self.label_ids:
            return unrestricted(model.objects.all())
        studies = self.studies()
        if model is Study:
            return studies
        if model is Patient:
            return Patient.objects.filter(Exists(studies.filter(patient=OuterRef("pk"))))
        if model is Series:
            return Series.objects.filter(study__in=studies)
        return Instance.objects.filter(series__study__in=studies)


NODE_SECONDS = 10.0
_nodes: dict[tuple[str, bool], tuple[float, NodeAccess]] = {}
_nodes_lock = threading.Lock()


def node_access(ae_title: str) -> NodeAccess:
    """The rights of the calling AE title ``ae_title`` (PS3.8 7.1.1.3, a calling AE title),
    read at most every NODE_SECONDS.

    Every association asks (a C-FIND association would otherwise pay two queries for it
    before its query); a change of a node in this process applies at once (``forget_nodes``
    on save, delete and label changes), one made in another process within ten seconds.
    """
    title = ae_title.strip()
    key = (title, bool(settings.PACS_QR_KNOWN_NODES_ONLY))
    now = time.monotonic()
    with _nodes_lock:
        cached = _nodes.get(key)
    if cached and now - cached[0] < NODE_SECONDS:
        return cached[1]
    found = _read_node_access(title)
    with _nodes_lock:
        if len(_nodes) > 1_000:
            _nodes.clear()
        _nodes[key] = (now, found)
    return found


def forget_nodes(**kwargs: object) -> None:
    """Drop the cached node rights (a RemoteNode or its labels changed; tests)."""
    with _nodes_lock:
        _nodes.clear()


def _read_node_access(title: str) -> NodeAccess:
    node = RemoteNode.objects.filter(ae_title=title).first()
    if node is None:
        open_ = not settings.PACS_QR_KNOWN_NODES_ONLY
        return NodeAccess(title, False, may_store=True, may_query=open_, may_retrieve=open_)
    labels = tuple(node.access_labels.values_list("pk", flat=True))
    return NodeAccess(title, True, node.may_store, node.may_query, node.may_retrieve, labels)


# ------------------------------------------------------------------------- labels for arriving studies


def apply_label_rules(study_id: int, series_id: int) -> list[str]:
    """Give the study the labels whose active rules match it (or the series' sender); return their names."""
    rules = list(LabelRule.objects.filter(active=True).select_related("label"))
    if not rules:
        return []
    study = Study.objects.filter(pk=study_id).values("institution_name", "referring_physician_name").first()
    series = Series.objects.filter(pk=series_id).values("source_ae_title").first()
    if study is None or series is None:
        return []
    values = {
        LabelRule.Attribute.CALLING_AE: series["source_ae_title"],
        LabelRule.Attribute.INSTITUTION: study["institution_name"],
        LabelRule.Attribute.REFERRING: study["referring_physician_name"],
    }
    labels: dict[int, AccessLabel] = {}
    for rule in rules:
        if fnmatch_dicom(values.get(rule.attribute, ""), rule.pattern):
            labels[rule.label_id] = rule.label
    if labels:
        Study.access_labels.through.objects.bulk_create(
            [Study.access_labels.through(study_id=study_id, accesslabel_id=pk) for pk in labels], ignore_conflicts=True
        )
    return sorted(label.name for label in labels.values())


def label_new_series(sender: object, study_id: int, series_id: int, created_series: bool, **kwargs: object) -> None:
    """``instance_stored`` receiver: label a study by the rules when a series of it first arrives."""
    if created_series:
        apply_label_rules(study_id, series_id)
