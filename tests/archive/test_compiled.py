"""The query engine's SQL kept per shape of query (archive.compiled): a query of a known
shape answers exactly what Django's own compilation of it answers."""

from __future__ import annotations

import pytest

from archive import compiled, query
from archive.access import NodeAccess
from archive.models import AccessLabel, Instance, Patient, Series, Study
from tests.archive.test_query import load_corpus

# Pairs of identifiers of one shape (the same keys, the same kinds of matching), with
# different values: the second is answered from the SQL the first one's shape left.
SAME_SHAPE = [
    ("STUDY", {"PatientName": "MÜLLER*"}, {"PatientName": "doe*"}),
    ("STUDY", {"PatientName": "muller^jurgen"}, {"PatientName": "Doe^Jane"}),
    ("STUDY", {"PatientName": "D?E^J*"}, {"PatientName": "M?LLER*"}),
    ("STUDY", {"AccessionNumber": "A1*"}, {"AccessionNumber": "A_*"}),
    ("STUDY", {"AccessionNumber": "A_1%"}, {"AccessionNumber": "A100"}),
    ("STUDY", {"StudyDate": "20240101-20240131"}, {"StudyDate": "20240201-20241231"}),
    ("STUDY", {"StudyDate": "20240115-20240131", "StudyTime": "1200-2300"}, {"StudyDate": "20240101-20240301", "StudyTime": "0800-1100"}),
    ("STUDY", {"StudyTime": "10"}, {"StudyTime": "23"}),
    ("STUDY", {"StudyInstanceUID": "1.2.9.1\\1.2.9.4"}, {"StudyInstanceUID": "1.2.9.2\\1.2.9.3"}),
    ("STUDY", {"PatientID": "P1", "StudyDescription": "", "NumberOfStudyRelatedInstances": ""}, {"PatientID": "P3", "StudyDescription": "", "NumberOfStudyRelatedInstances": ""}),
    ("PATIENT", {"PatientName": "*山田*", "NumberOfPatientRelatedStudies": ""}, {"PatientName": "*jane*", "NumberOfPatientRelatedStudies": ""}),
    ("SERIES", {"StudyInstanceUID": "1.2.9.1", "Modality": "CT"}, {"StudyInstanceUID": "1.2.9.4", "Modality": "US"}),
    ("IMAGE", {"SeriesInstanceUID": "1.2.9.1.1", "InstanceNumber": "1\\3"}, {"SeriesInstanceUID": "1.2.9.4.1", "InstanceNumber": "2\\9"}),
    ("IMAGE", {"SeriesInstanceUID": "1.2.9.1.1", "InstanceNumber": "2"}, {"SeriesInstanceUID": "1.2.9.5.1", "InstanceNumber": "7"}),
]


def by_django(level: str, keys: dict) -> list[dict]:
    """The answers with Django compiling the query (a scope without the mark)."""
    return list(query.find(level, keys, queryset=query.MODELS[level].objects.all()))


def by_shape(level: str, keys: dict) -> list[dict]:
    return list(query.find(level, keys, queryset=compiled.unrestricted(query.MODELS[level].objects.all())))


@pytest.fixture
def corpus(db):
    compiled.clear()
    load_corpus()
    yield
    compiled.clear()


@pytest.mark.parametrize("level, first, second", SAME_SHAPE)
def test_a_known_shape_answers_as_django_does(corpus, level: str, first: dict, second: dict) -> None:
    unique = query.UNIQUE_KEYS[level]
    first, second = {unique: "", **first}, {unique: "", **second}
    assert by_shape(level, first) == by_django(level, first)
    hits = compiled.stats.hits
    answers = by_shape(level, second)
    assert compiled.stats.hits == hits + 1  # answered from the shape's SQL
    assert answers == by_django(level, second)
    assert answers  # the corpus holds matches for every second identifier
    assert by_shape(level, first) == by_django(level, first)


def test_values_that_compile_to_other_sql_go_through_django(corpus) -> None:
    """A list with a repeated UID compiles to fewer parameters than its shape's SQL has."""
    keys = {"StudyInstanceUID": "1.2.9.1\\1.2.9.4"}
    by_shape("STUDY", keys)
    fallbacks = compiled.stats.fallbacks
    repeated = {"StudyInstanceUID": "1.2.9.2\\1.2.9.2"}
    assert [a["StudyInstanceUID"] for a in by_shape("STUDY", repeated)] == ["1.2.9.2"]
    assert compiled.stats.fallbacks == fallbacks + 1
    assert by_shape("STUDY", repeated) == by_django("STUDY", repeated)


def test_a_scope_narrowed_to_a_node_never_takes_a_shapes_sql(corpus) -> None:
    """The same shape over a node's scope (its access labels) is compiled by Django every
    time, and answers only the node's studies."""
    label = AccessLabel.objects.create(name="cardiology")
    Study.objects.get(study_instance_uid="1.2.9.3").access_labels.add(label)
    keys = {"StudyInstanceUID": "", "PatientName": "doe*"}
    assert {a["StudyInstanceUID"] for a in by_shape("STUDY", keys)} == {"1.2.9.3", "1.2.9.5"}
    node = NodeAccess("CARDIO", True, True, True, True, label_ids=(label.pk,))
    before = (compiled.stats.hits, compiled.stats.misses, compiled.stats.fallbacks)
    for _ in range(3):
        answers = list(query.find("STUDY", keys, queryset=node.scope(Study)))
        assert [a["StudyInstanceUID"] for a in answers] == ["1.2.9.3"]
    assert (compiled.stats.hits, compiled.stats.misses, compiled.stats.fallbacks) == before


def test_the_mark_does_not_survive_a_filter(db) -> None:
    everything = compiled.unrestricted(Study.objects.all())
    assert compiled.is_unrestricted(everything)
    assert not compiled.is_unrestricted(everything.filter(accession_number="A100"))
    assert not compiled.is_unrestricted(everything.all())
    for model in (Patient, Study, Series, Instance):
        assert compiled.is_unrestricted(NodeAccess("ANY", True, True, True, True).scope(model))


def test_a_value_django_compiles_otherwise_goes_through_django(corpus) -> None:
    """An instance number beyond the column's range: Django answers "nothing" without a
    query (its overflow check); the shape's SQL is not used for it."""
    from django.db.models import Q

    def build(filters: Q):
        return Instance.objects.filter(filters).order_by("pk").values("instance_number")

    base = compiled.unrestricted(Instance.objects.all())
    key = ("test", "instance_number")
    assert compiled.fetch(key, Q(instance_number=7), base, build) == [{"instance_number": 7}]
    assert compiled.fetch(key, Q(instance_number=2), base, build) == [{"instance_number": 2}] * 3
    fallbacks = compiled.stats.fallbacks
    assert compiled.fetch(key, Q(instance_number=10**30), base, build) == []
    assert compiled.stats.fallbacks == fallbacks + 1
