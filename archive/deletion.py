"""Deleting a study or a series: its files and its rows together.

The files are first moved aside (a rename on the storage filesystem), then the rows are
deleted in one transaction; only when it commits are the moved files removed. A failure
puts the files back, so the archive never holds a row without its file or keeps a file of
deleted rows (``checkarchive`` verifies it).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from django.db import transaction
from django.db.models import F

from archive import storage
from archive.models import Instance, Patient, Series, Study


def delete_study(study: Study) -> int:
    """Delete ``study`` with its series, instances and files; return the instances removed."""
    return _delete(Instance.objects.filter(series__study=study), lambda: _remove_study(study.pk))


def delete_series(series: Series) -> int:
    """Delete ``series`` with its instances and files, keeping its study's counts right."""
    return _delete(Instance.objects.filter(series=series), lambda: _remove_series(series.pk))


def _delete(instances, remove_rows) -> int:
    paths = list(instances.values_list("file_path", flat=True))
    trash = storage.root() / ".trash" / uuid.uuid4().hex
    moved: list[tuple[Path, Path]] = []
    try:
        trash.mkdir(parents=True)
        for index, relative in enumerate(paths):
            source = storage.absolute(relative)
            target = trash / str(index)
            try:
                os.replace(source, target)
            except FileNotFoundError:
                continue
            moved.append((source, target))
        with transaction.atomic():
            remove_rows()
    except BaseException:
        for source, target in moved:
            os.replace(target, source)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return len(paths)


def _remove_study(study_pk: int) -> None:
    study = Study.objects.select_for_update().get(pk=study_pk)
    patient_pk = study.patient_id
    study.delete()
    if not Study.objects.filter(patient_id=patient_pk).exists():
        Patient.objects.filter(pk=patient_pk).delete()


def _remove_series(series_pk: int) -> None:
    series = Series.objects.select_related("study").get(pk=series_pk)
    study = Study.objects.select_for_update().get(pk=series.study_id)
    series.delete()
    if not Series.objects.filter(study=study).exists():
        _remove_study(study.pk)
        return
    modalities = sorted({m for m in Series.objects.filter(study=study).values_list("modality", flat=True) if m})
    Study.objects.filter(pk=study.pk).update(
        number_of_study_related_series=F("number_of_study_related_series") - 1,
        number_of_study_related_instances=F("number_of_study_related_instances") - series.number_of_series_related_instances,
        study_size=F("study_size") - series.series_size,
        modalities_in_study="\\".join(modalities)[:256],
    )
