"""The access service: which studies a user may see.

Every web view (and later every API viewset, DICOMweb endpoint and DIMSE handler) narrows its
rows through these functions before it reads, so that scope is decided in one place. An
object out of scope is treated as absent (404 on the web). For now every active, signed-in
user sees every study; roles and access labels narrow this in one place here.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from archive.models import Instance, Series, Study


def studies_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Study]:
    """The studies ``user`` may see."""
    if not user.is_authenticated or not user.is_active:
        return Study.objects.none()
    return Study.objects.all()


def series_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Series]:
    """The series of the studies ``user`` may see."""
    if not user.is_authenticated or not user.is_active:
        return Series.objects.none()
    return Series.objects.all()


def instances_for(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Instance]:
    """The instances of the studies ``user`` may see."""
    if not user.is_authenticated or not user.is_active:
        return Instance.objects.none()
    return Instance.objects.all()
