#!/usr/bin/env python3
"""Query (C-FIND) benchmark: pacsportal's C-FIND SCP on a large archive, and against Orthanc on a small one.

Large archive: fills a fresh pacsportal database directly (Django ``bulk_create`` in
batches, no files) with 10,000 studies and 1,000,000 instances of about 3,000 patients
(names with Müller, Øster, 山田 and the like), spread over three years and five
modalities, one series holding exactly 500 instances. Then times, end to end from the
client's side:

* STUDY level by PatientName prefix, by a one-month StudyDate range, by AccessionNumber,
* SERIES level for one study (StudyInstanceUID),
* IMAGE level for the 500-instance series,

each with pynetdicom (one association, each C-FIND round trip timed until the last
response) and with DCMTK ``findscu`` (``TCP_NODELAY=1``, a process per query, timed from
process start to exit), checking every answer count against the generated data. For the
same queries it prints the SQL plan (``EXPLAIN``; ``EXPLAIN ANALYZE`` on PostgreSQL) and
whether the indexes are used, and the time the query engine (``archive.query.find``) and
the encoding of the answers take inside one process.

Small archive: 20 studies (120 small files made with pydicom) stored with ``storescu``
into pacsportal and into Orthanc (``/usr/sbin/Orthanc``, temporary configuration); STUDY
level ``findscu`` against both (all studies, and PatientName=SMITH*: Orthanc matches names
accent-sensitively, so MULLER* would not be like for like), process start to exit, with an
``echoscu`` row as the baseline of a process and an association.

The tables are printed and written as markdown to ``bench/results/query-<timestamp>.md``.
Every subprocess, temporary folder and database is removed on exit, Ctrl-C or SIGTERM.

Usage::

    .venv/bin/python bench/query.py [--db sqlite|postgres|both] [--quick | --studies N] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pynetdicom
from psycopg import sql
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - the ingest benchmark's process, receiver and PostgreSQL helpers
from ingest import HOST, ORTHANC_BINARY, BenchError, Config, PacsReceiver, Processes, Terminated  # noqa: E402
from stats import interval_text, median_interval, noise_words  # noqa: E402

ROOT = ingest.ROOT
RESULTS_DIR = ingest.RESULTS_DIR
CALLING_AE = ingest.CALLING_AE
PACS_AE = ingest.PACS_AE
ORTHANC_AE = ingest.ORTHANC_AE

FULL_STUDIES = 10_000
QUICK_STUDIES = 1_000
INSTANCES_PER_STUDY = 100  # 10,000 studies: 1,000,000 instances
PATIENTS_PER_STUDY = 0.3  # 10,000 studies: 3,000 patients
KNOWN_SERIES_SIZE = 500
BATCH = 5_000  # rows per bulk_create call (SQLite splits each into statements of 999 parameters)
REPEATS = 20
SEED = 20261123
FIRST_DAY = dt.date(2023, 1, 1)
DAYS = 3 * 365 + 1  # 2023-01-01 .. 2025-12-31
NAME_PREFIX = "MULLER*"
MONTH = ("20240601", "20240630")
FILL_TIMEOUT = 3_600.0
CHILD_TIMEOUT = 1_200.0
FIND_TIMEOUT = 120.0
# Targets from the spec, PostgreSQL, end to end (median).
STUDY_TARGET_MS = 50.0
IMAGE_TARGET_MS = 300.0
UID_ROOT = f"{PYDICOM_ROOT_UID}4242."
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
}
# (modality, share of studies, instances per series (low, high), bytes per instance, rows, columns)
MODALITIES = [
    ("CT", 0.30, (80, 400), 526_000, 512, 512),
    ("MR", 0.20, (20, 200), 135_000, 256, 256),
    ("CR", 0.25, (1, 3), 8_400_000, 2048, 2048),
    ("US", 0.15, (5, 40), 310_000, 480, 640),
    ("MG", 0.10, (1, 4), 27_000_000, 3328, 4096),
]
DESCRIPTIONS = {
    "CT": ["CT THORAX", "CT ABDOMEN PELVIS", "CT HEAD", "CT ANGIO", "CT SPINE"],
    "MR": ["MR BRAIN", "MR KNEE", "MR LUMBAR SPINE", "MR PELVIS", "MR SHOULDER"],
    "CR": ["CHEST PA/LAT", "HAND", "KNEE", "PELVIS", "ANKLE"],
    "US": ["US ABDOMEN", "US THYROID", "US OBSTETRIC", "US BREAST"],
    "MG": ["MAMMO SCREENING", "MAMMO DIAGNOSTIC"],
}
BODY_PARTS = {"CT": "CHEST", "MR": "BRAIN", "CR": "CHEST", "US": "ABDOMEN", "MG": "BREAST"}
# Family names: (alphabetic, ideographic or "", relative frequency). A realistic mix for a
# European hospital, with accents, Ø, and Japanese names with their ideographic group.
# One patient in MULLER_EVERY is a Müller (about its frequency in Germany), the name the
# name-prefix query looks for: so every archive size has a few.
MULLER_EVERY = 240
FAMILIES = [
    ("Schmidt", "", 10), ("Schneider", "", 8), ("Fischer", "", 8), ("Weber", "", 7),
    ("Meyer", "", 7), ("Wagner", "", 6), ("Becker", "", 6), ("Schulz", "", 5), ("Hoffmann", "", 5),
    ("Smith", "", 8), ("Johnson", "", 5), ("Brown", "", 5), ("Jones", "", 4), ("Miller", "", 4),
    ("Martin", "", 6), ("Bernard", "", 5), ("Dubois", "", 4), ("Lefèvre", "", 3), ("Moreau", "", 3),
    ("Øster", "", 3), ("Østergaard", "", 2), ("Jensen", "", 5), ("Nielsen", "", 5), ("Sørensen", "", 3),
    ("Hansen", "", 4), ("Rossi", "", 4), ("Bianchi", "", 3), ("García", "", 5), ("Rodríguez", "", 4),
    ("Fernández", "", 3), ("López", "", 3), ("Kowalski", "", 3), ("Wiśniewski", "", 2), ("Dvořák", "", 2),
    ("Nagy", "", 2), ("Kovács", "", 2), ("Yılmaz", "", 2), ("Papadopoulos", "", 2), ("O'Brien", "", 2),
    ("Nguyen", "", 3), ("Kim", "", 2), ("Wang", "", 2), ("Li", "", 2), ("Chen", "", 2),
    ("Mullins", "", 2), ("Mueller", "", 2),
    ("Yamada", "山田", 3), ("Tanaka", "田中", 2), ("Suzuki", "鈴木", 2), ("Sato", "佐藤", 2), ("Takahashi", "高橋", 1),
]
GIVEN = ["Anna", "Hans", "Jürgen", "Marie", "Peter", "Sofia", "Lukas", "Émile", "Karin", "John", "Jane", "Ole",
         "Søren", "Ingrid", "Luca", "Giulia", "José", "María", "Piotr", "Agnieszka", "Ahmet", "Eleni", "Minh"]
JAPANESE_GIVEN = [("Tarou", "太郎"), ("Hanako", "花子"), ("Kenji", "健二"), ("Yuki", "由紀")]
PHYSICIANS = ["Weber^Klaus^^Dr.", "Durand^Claire", "Okafor^Ngozi", "Lindqvist^Erik", "Rossi^Paolo", ""]

STUDY_KEYS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
]
SERIES_KEYS = [
    "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances",
]
IMAGE_KEYS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns",
    "NumberOfFrames",
]
# The big tables: a sequential scan of one of them is what the indexes are there to avoid.
BIG_TABLES = ("archive_instance", "archive_series", "archive_study")


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class SeriesPlan:
    uid: str
    number: int
    modality: str
    description: str
    instances: int


@dataclass(frozen=True)
class StudyPlan:
    index: int
    patient: int
    uid: str
    accession: str
    date: dt.date
    time: dt.time
    description: str
    referring: str
    series: list[SeriesPlan]


@dataclass(frozen=True)
class PatientPlan:
    patient_id: str
    name: str
    birth_date: dt.date
    sex: str


@dataclass
class ArchivePlan:
    """The generated archive, the same every time for the same size (a fixed seed)."""

    patients: list[PatientPlan]
    studies: list[StudyPlan]
    known_study: int  # index of the study holding the 500-instance series (its first series)

    @property
    def series_count(self) -> int:
        return sum(len(s.series) for s in self.studies)

    @property
    def instance_count(self) -> int:
        return sum(x.instances for s in self.studies for x in s.series)


def build_plan(studies: int, instances_per_study: int = INSTANCES_PER_STUDY) -> ArchivePlan:
    """Generate the archive: patients, studies, series and how many instances each series has.

    The total is exactly ``studies * instances_per_study`` instances; one CT series (the
    first of the study in the middle) has exactly KNOWN_SERIES_SIZE.
    """
    rng = random.Random(SEED)
    total = studies * instances_per_study
    patients: list[PatientPlan] = []
    family_weights = [f[2] for f in FAMILIES]
    for number in range(max(10, round(studies * PATIENTS_PER_STUDY))):
        family, ideographic, _ = rng.choices(FAMILIES, weights=family_weights)[0]
        if number % MULLER_EVERY == 17:
            family, ideographic = "Müller", ""
        if ideographic:
            given, given_ideographic = rng.choice(JAPANESE_GIVEN)
            name = f"{family}^{given}={ideographic}^{given_ideographic}"
        else:
            name = f"{family}^{rng.choice(GIVEN)}"
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(90 * 365))
        patients.append(PatientPlan(f"P{number + 1:07d}", name, birth, rng.choice("FM")))

    known_study = studies // 2
    shares = [m[1] for m in MODALITIES]
    by_modality = {m[0]: m for m in MODALITIES}
    drafts = []  # (study fields, [(modality, weight)])
    for index in range(studies):
        patient = index if index < len(patients) else rng.randrange(len(patients))
        primary = "CT" if index == known_study else rng.choices(MODALITIES, weights=shares)[0][0]
        n_series = rng.choice((2, 3, 3, 4, 4, 5))
        modalities = [primary] * n_series
        if rng.random() < 0.15:  # now and then a study of two modalities (CT with a CR scout, ...)
            modalities[-1] = rng.choice([m for m in by_modality if m != primary])
        weights = [rng.uniform(*by_modality[m][2]) for m in modalities]
        date = FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS))
        time = dt.time(rng.randrange(7, 20), rng.randrange(60), rng.randrange(60))
        fields = (index, patient, date, time, rng.choice(DESCRIPTIONS[primary]), rng.choice(PHYSICIANS))
        drafts.append((fields, list(zip(modalities, weights))))

    # Scale the weights so that the instances add up to the total exactly.
    free = [(i, j) for i, (_, series) in enumerate(drafts) for j in range(len(series)) if (i, j) != (known_study, 0)]
    budget = total - KNOWN_SERIES_SIZE
    if budget < len(free):
        raise SystemExit(f"{studies} studies are too few for {total} instances with one series of {KNOWN_SERIES_SIZE}")
    weight_sum = sum(drafts[i][1][j][1] for i, j in free)
    counts = {(i, j): max(1, int(drafts[i][1][j][1] * budget / weight_sum)) for i, j in free}
    missing = budget - sum(counts.values())
    by_size = sorted(free, key=lambda key: -counts[key])
    position = 0
    while missing:
        key = by_size[position % len(by_size)]
        step = 1 if missing > 0 else -1
        if counts[key] + step >= 1:
            counts[key] += step
            missing -= step
        position += 1
    counts[(known_study, 0)] = KNOWN_SERIES_SIZE

    plans = []
    for i, ((index, patient, date, time, description, referring), series) in enumerate(drafts):
        uid = f"{UID_ROOT}{index + 1}"
        series_plans = [
            SeriesPlan(f"{uid}.{j + 1}", j + 1, modality, f"{modality} series {j + 1}", counts[(i, j)])
            for j, (modality, _) in enumerate(series)
        ]
        plans.append(
            StudyPlan(index, patient, uid, f"A{index + 1:07d}", date, time, description, referring, series_plans)
        )
    return ArchivePlan(patients, plans, known_study)


def fold(name: str) -> str:
    """Case- and accent-folded text (for the expected answer counts, independently of the archive's code)."""
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True)
class Query:
    """One C-FIND: its label, level and identifier (keyword: value, "" to ask for the attribute)."""

    name: str
    level: str
    keys: dict[str, str]
    expected: int
    target_ms: float | None = None

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword, value in self.keys.items():
            setattr(ds, keyword, value or None)  # None: a zero-length (universal) key of any VR
        return ds

    def findscu_keys(self) -> list[str]:
        args = ["-k", f"QueryRetrieveLevel={self.level}"]
        for keyword, value in self.keys.items():
            args += ["-k", f"{keyword}={value}" if value else keyword]
        return args


def study_keys(**matching: str) -> dict[str, str]:
    return {keyword: matching.get(keyword, "") for keyword in STUDY_KEYS}


def large_queries(plan: ArchivePlan) -> list[Query]:
    """The measured queries, with the answer counts the generated data gives."""
    prefix = fold(NAME_PREFIX.rstrip("*"))
    low, high = (dt.datetime.strptime(d, "%Y%m%d").date() for d in MONTH)
    by_name = sum(1 for s in plan.studies if fold(plan.patients[s.patient].name).startswith(prefix))
    by_date = sum(1 for s in plan.studies if low <= s.date <= high)
    accession_study = plan.studies[len(plan.studies) // 3]
    known = plan.studies[plan.known_study]
    series_keys = {keyword: "" for keyword in SERIES_KEYS} | {"StudyInstanceUID": known.uid}
    image_keys = {keyword: "" for keyword in IMAGE_KEYS} | {
        "StudyInstanceUID": known.uid,
        "SeriesInstanceUID": known.series[0].uid,
    }
    return [
        Query(f"STUDY, PatientName={NAME_PREFIX}", "STUDY", study_keys(PatientName=NAME_PREFIX), by_name, STUDY_TARGET_MS),
        Query(
            f"STUDY, StudyDate={MONTH[0]}-{MONTH[1]}",
            "STUDY",
            study_keys(StudyDate=f"{MONTH[0]}-{MONTH[1]}"),
            by_date,
            STUDY_TARGET_MS,
        ),
        Query(
            "STUDY, AccessionNumber (one)",
            "STUDY",
            study_keys(AccessionNumber=accession_study.accession),
            sum(1 for s in plan.studies if s.accession == accession_study.accession),
            STUDY_TARGET_MS,
        ),
        Query("SERIES, StudyInstanceUID", "SERIES", series_keys, len(known.series)),
        Query(
            f"IMAGE, {KNOWN_SERIES_SIZE}-instance series",
            "IMAGE",
            image_keys,
            known.series[0].instances,
            IMAGE_TARGET_MS,
        ),
    ]


# --------------------------------------------------------------------------- child side (Django)


def django_setup() -> None:
    """Set up Django in this (child) process with the environment the parent gave it."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pacsportal.settings")
    import django

    django.setup()


def child_fill(studies: int, with_instances: bool = True) -> dict[str, Any]:
    """Fill the (migrated, empty) database with the generated archive; return the timings.
    Without instances, only patients, studies and series (what the study list reads)."""
    django_setup()
    from django.db import connection, transaction

    from archive.dicom import normalize_name
    from archive.models import Instance, Patient, Series, Study

    def progress(text: str) -> None:
        print(f"    {text}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    plan = build_plan(studies)
    sizes = {m[0]: m[3] for m in MODALITIES}
    shapes = {m[0]: (m[4], m[5]) for m in MODALITIES}

    def bulk(model, objects: list) -> None:
        for start in range(0, len(objects), BATCH):
            with transaction.atomic():
                model.objects.bulk_create(objects[start : start + BATCH], batch_size=BATCH)

    patients = [
        Patient(
            patient_id=p.patient_id,
            patient_name=p.name,
            patient_name_norm=normalize_name(p.name),
            patient_birth_date=p.birth_date,
            patient_sex=p.sex,
        )
        for p in plan.patients
    ]
    bulk(Patient, patients)
    studies_rows = []
    for s in plan.studies:
        modalities = sorted({x.modality for x in s.series})
        instances = sum(x.instances for x in s.series)
        studies_rows.append(
            Study(
                patient_id=patients[s.patient].pk,
                study_instance_uid=s.uid,
                accession_number=s.accession,
                study_date=s.date,
                study_time=s.time,
                study_description=s.description,
                referring_physician_name=s.referring,
                study_id=str(s.index % 10_000 + 1),
                institution_name="Bench Hospital",
                modalities_in_study="\\".join(modalities),
                number_of_study_related_series=len(s.series),
                number_of_study_related_instances=instances,
                study_size=sum(x.instances * sizes[x.modality] for x in s.series),
            )
        )
    bulk(Study, studies_rows)
    series_rows = []
    for s, study in zip(plan.studies, studies_rows):
        for x in s.series:
            series_rows.append(
                Series(
                    study_id=study.pk,
                    series_instance_uid=x.uid,
                    series_number=x.number,
                    modality=x.modality,
                    series_description=x.description,
                    body_part_examined=BODY_PARTS[x.modality],
                    series_date=s.date,
                    series_time=s.time,
                    station_name=f"{x.modality}01",
                    number_of_series_related_instances=x.instances,
                    series_size=x.instances * sizes[x.modality],
                )
            )
    bulk(Series, series_rows)
    progress(f"{len(patients)} patients, {len(studies_rows)} studies, {len(series_rows)} series "
             f"in {time.perf_counter() - started:.1f} s")

    total = plan.instance_count if with_instances else 0
    pending: list = []
    done = 0
    number = 0
    next_report = 100_000
    series_iter = iter(series_rows)
    for s in plan.studies if with_instances else []:
        for x in s.series:
            series_pk = next(series_iter).pk
            sop_class = SOP_CLASSES[x.modality]
            rows, columns = shapes[x.modality]
            for k in range(1, x.instances + 1):
                uid = f"{x.uid}.{k}"
                number += 1
                pending.append(
                    Instance(
                        series_id=series_pk,
                        sop_instance_uid=uid,
                        sop_class_uid=sop_class,
                        instance_number=k,
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        rows=rows,
                        columns=columns,
                        bits_allocated=16,
                        file_path=f"bench/{number:08d}.dcm",
                        file_size=sizes[x.modality],
                        file_sha256="0" * 64,
                        metadata={
                            "00080016": {"vr": "UI", "Value": [sop_class]},
                            "00080018": {"vr": "UI", "Value": [uid]},
                            "00080060": {"vr": "CS", "Value": [x.modality]},
                            "00200013": {"vr": "IS", "Value": [k]},
                        },
                    )
                )
                if len(pending) == BATCH:
                    bulk(Instance, pending)
                    done += len(pending)
                    pending = []
                    if done >= next_report:
                        elapsed = time.perf_counter() - started
                        progress(f"{done:,}/{total:,} instances, {elapsed:.0f} s")
                        next_report += 100_000
    bulk(Instance, pending)
    filled = time.perf_counter() - started
    analyzed = 0.0
    if connection.vendor == "postgresql":
        # Autovacuum would do this a little later on its own; doing it now keeps it from
        # running in the middle of the measurements.
        analyze_start = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
        analyzed = time.perf_counter() - analyze_start
    counts = {
        "patients": Patient.objects.count(),
        "studies": Study.objects.count(),
        "series": Series.objects.count(),
        "instances": Instance.objects.count(),
    }
    return {"fill_seconds": filled, "analyze_seconds": analyzed, "counts": counts, "vendor": connection.vendor}


def scan_verdict(vendor: str, plan_lines: list[str]) -> dict[str, Any]:
    """Which indexes a plan uses and which tables it reads whole."""
    indexes: list[str] = []
    full_scans: list[str] = []
    for line in plan_lines:
        if vendor == "postgresql":
            for match in re.finditer(r"(?:Index Only Scan|Index Scan)(?: Backward)? using (\S+) on (\S+)", line):
                indexes.append(f"{match.group(1)} ({match.group(2)})")
            for match in re.finditer(r"Bitmap Index Scan on (\S+)", line):
                indexes.append(match.group(1))
            for match in re.finditer(r"Seq Scan on (\S+)", line):
                full_scans.append(match.group(1))
        else:
            match = re.search(r"\b(SEARCH|SCAN) (\S+)(?: AS \S+)?(?: USING (?:COVERING )?(INDEX \S+|INTEGER PRIMARY KEY))?", line)
            if not match:
                continue
            what, table, index = match.groups()
            if what == "SEARCH":
                indexes.append(f"{(index or '').replace('INDEX ', '')} ({table})")
            else:
                # SCAN: every row of the table (in index order when an index is named).
                full_scans.append(table + (f" in {index.replace('INDEX ', '')} order" if index else ""))
    big_full = [t for t in full_scans if t.split()[0] in BIG_TABLES]
    return {"indexes": indexes, "full_scans": full_scans, "index_used": bool(indexes) and not big_full}


def child_explain(queries: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """EXPLAIN each query as the engine builds it, and time the engine and the answers' encoding in-process."""
    django_setup()
    from django.conf import settings
    from django.db import connection
    from archive import query as engine
    from archive.dimse.find import encode_answer

    limit = settings.PACS_FIND_LIMIT + 1  # what archive/dimse/find.py asks for
    out = []
    for q in queries:
        plan = engine.plan_query(q["level"], q["keys"])
        rows = plan.queryset(None).order_by("pk")[:limit].values(*plan.columns())
        if connection.vendor == "postgresql":
            text = rows.explain(analyze=True, buffers=False)
        else:
            text = rows.explain()
        plan_lines = [line for line in text.splitlines() if line.strip()]
        engine_ms, encode_ms, answers = [], [], 0
        for _ in range(repeats + 1):  # the first one warms up, untimed
            t0 = time.perf_counter()
            found = list(engine.find(q["level"], q["keys"], limit=limit))
            t1 = time.perf_counter()
            for answer in found:
                answer["RetrieveAETitle"] = settings.PACS_AE_TITLE  # as the SCP adds it
                encode_answer(answer, explicit_vr=True)
            t2 = time.perf_counter()
            engine_ms.append((t1 - t0) * 1000)
            encode_ms.append((t2 - t1) * 1000)
            answers = len(found)
        out.append(
            {
                "name": q["name"],
                "sql": str(rows.query),
                "plan": plan_lines,
                "answers": answers,
                "engine_ms": statistics.median(engine_ms[1:]),
                "encode_ms": statistics.median(encode_ms[1:]),
                **scan_verdict(connection.vendor, plan_lines),
            }
        )
    return {"vendor": connection.vendor, "queries": out}


def run_child(env: dict[str, str], args: list[str], timeout: float) -> dict[str, Any]:
    """Run this script as a child with ``env`` (the receiver's); return the JSON it prints last.
    Its progress (stderr) goes to our stderr."""
    child_env = dict(env, DJANGO_SETTINGS_MODULE="pacsportal.settings")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        cwd=ROOT,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args[:2])} failed with status {done.returncode}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise BenchError(f"unexpected output from {' '.join(args[:2])}: {done.stdout[-500:]!r}") from exc


# --------------------------------------------------------------------------- clients


@dataclass
class Timings:
    """The round trips of one query with one client, in milliseconds, and the errors."""

    ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: int | None = None
    by_round: dict[int, float] = field(default_factory=dict)  # round -> ms, where rounds interleave targets

    def median(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None

    def p90(self) -> float | None:
        if not self.ms:
            return None
        ordered = sorted(self.ms)
        return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest rank


class PynetdicomClient:
    """One Study Root C-FIND association, reused for every query; TCP_NODELAY on its socket
    (otherwise Nagle's algorithm holds each request's second PDU for the peer's delayed ACK)."""

    def __init__(self, ae_title: str, port: int) -> None:
        _config.LOG_HANDLER_LEVEL = "none"  # no per-PDU debug summaries, as in the SCP
        # No text rendering of each answer for the log, as findscu's --hide-responses: left
        # on, pynetdicom formats every identifier (pretty_dataset) whether or not the log
        # keeps it, which is more than half of this client's time for 318 answers.
        _config.LOG_RESPONSE_IDENTIFIERS = False
        self.ae = AE(ae_title=CALLING_AE)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = FIND_TIMEOUT
        self.assoc = self.ae.associate(HOST, port, ae_title=ae_title)
        if not self.assoc.is_established:
            self.ae.shutdown()
            raise BenchError(f"pynetdicom could not associate with {ae_title} on port {port}")
        self.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def find(self, query: Query) -> tuple[float, int]:
        """Send one C-FIND; return (milliseconds until the final response, pending answers)."""
        identifier = query.identifier()
        answers = 0
        started = time.perf_counter()
        for status, _ in self.assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise BenchError("no C-FIND response (timeout or association aborted)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                answers += 1
            elif code != 0x0000:
                raise BenchError(f"C-FIND status 0x{code:04X}: {status.get('ErrorComment', '')}")
        return (time.perf_counter() - started) * 1000, answers

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


# findscu -v --hide-responses logs "Received Find Response 3 (Pending)" for each answer.
FIND_RESPONSE = re.compile(r"Find Response:? \d+ \(Pending\)")


def wait_exit(proc: subprocess.Popen, processes: Processes, timeout: float) -> int:
    """Wait for ``proc`` to exit and return its status; kill it after ``timeout`` seconds.

    A blocking wait, noticed the moment the process ends: ``Popen.wait(timeout)`` (what
    ``Processes.wait`` uses) polls with sleeps that double up to 50 ms, which made a 35 ms
    ``findscu`` look like 64 ms.
    """
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    code = processes.wait(proc, 5.0)  # already reaped: forgets it and closes its log
    if expired.is_set():
        raise BenchError(f"{Path(str(proc.args[0])).name} did not finish within {timeout:.0f} s")
    return code


def findscu(query: Query, ae_title: str, port: int, processes: Processes, log_path: Path) -> tuple[float, int]:
    """Run one ``findscu`` (Study Root, TCP_NODELAY=1); return (milliseconds from process
    start to exit, pending answers)."""
    args = ["findscu", "-S", "-v", "--hide-responses", "-aet", CALLING_AE, "-aec", ae_title]
    args += ["-to", "30", "-ta", "30", "-td", str(int(FIND_TIMEOUT)), *query.findscu_keys(), HOST, str(port)]
    log_path.write_bytes(b"")
    started = time.perf_counter()
    proc = processes.start(args, ingest.clean_env(TCP_NODELAY="1"), log_path)
    code = wait_exit(proc, processes, FIND_TIMEOUT)
    elapsed = (time.perf_counter() - started) * 1000
    text = log_path.read_text(errors="replace")
    if code != 0 or "Final Find Response" not in text or "(Success)" not in text.split("Final Find Response")[-1]:
        raise BenchError(f"findscu exited with status {code}:\n{ingest.tail(log_path)}")
    return elapsed, len(FIND_RESPONSE.findall(text))


def echoscu(ae_title: str, port: int, processes: Processes, log_path: Path) -> tuple[float, int]:
    """Run one ``echoscu`` (TCP_NODELAY=1): the cost of a process and an association with no
    query. Return (milliseconds from process start to exit, 0)."""
    args = ["echoscu", "-aet", CALLING_AE, "-aec", ae_title, "-to", "30", "-ta", "30", "-td", "30", HOST, str(port)]
    log_path.write_bytes(b"")
    started = time.perf_counter()
    proc = processes.start(args, ingest.clean_env(TCP_NODELAY="1"), log_path)
    code = wait_exit(proc, processes, FIND_TIMEOUT)
    elapsed = (time.perf_counter() - started) * 1000
    if code != 0:
        raise BenchError(f"echoscu exited with status {code}:\n{ingest.tail(log_path)}")
    return elapsed, 0


def record(timings: Timings, query: Query, result: tuple[float, int], round_index: int | None = None) -> None:
    """Keep a round trip's time, or an error when its answer count is not the expected one."""
    elapsed, answers = result
    timings.answers = answers
    if answers != query.expected:
        timings.errors.append(f"{answers} answers, expected {query.expected}")
    else:
        timings.ms.append(elapsed)
        if round_index is not None:
            timings.by_round[round_index] = elapsed


def measure_once(timings: Timings, query: Query, round_index: int, run_once) -> None:
    """One client run: its error kept, or (past the warm-up round 0) its time recorded."""
    try:
        result = run_once()
    except BenchError as exc:
        timings.errors.append(str(exc))
        return
    if round_index:
        record(timings, query, result, round_index)


def paired_ratio(timings: Timings, reference: Timings) -> tuple[float, float, float] | None:
    """The median, over the rounds both have, of ``timings`` over ``reference`` in the same
    round, with a 95% bootstrap interval of that median (``stats.median_interval``)."""
    rounds = sorted(set(timings.by_round) & set(reference.by_round))
    return median_interval([timings.by_round[r] / reference.by_round[r] for r in rounds if reference.by_round[r] > 0])


def paired_text(timings: Timings, reference: Timings) -> str:
    return interval_text(paired_ratio(timings, reference))


# --------------------------------------------------------------------------- servers


class PostgresAdmin(ingest.PostgresAdmin):
    """The ingest benchmark's throw-away databases, named after this benchmark."""

    prefix = "bench_query"


class OrthancFind(ingest.OrthancReceiver):
    """Orthanc with a temporary configuration that lets any AE title query (C-FIND)."""

    extra_config = {"DicomAlwaysAllowFind": True}  # the default (false) refuses unknown AE titles


def new_pacs(db: str, work: Path, processes: Processes, pg: PostgresAdmin | None) -> PacsReceiver:
    """A pacsportal receiver (one SCP process) with a fresh, migrated, empty database."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"pacs-{db}-", dir=work))
    receiver = PacsReceiver(Config("pacs", 1, db, 1), run_dir, processes, pg)
    receiver.manage("migrate", "--noinput", "-v", "0")
    return receiver


def drop(receiver: ingest.Receiver) -> None:
    receiver.stop()
    shutil.rmtree(receiver.run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the large archive


@dataclass
class LargeRun:
    """One database's results on the large archive."""

    db: str
    fill: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)
    timings: dict[tuple[str, str], Timings] = field(default_factory=dict)  # (query name, client)
    errors: list[str] = field(default_factory=list)


def run_large(
    db: str,
    args: argparse.Namespace,
    plan: ArchivePlan,
    queries: list[Query],
    work: Path,
    processes: Processes,
    pg: PostgresAdmin | None,
) -> LargeRun:
    """Fill a fresh database, EXPLAIN, start runscp and time the queries with both clients."""
    run = LargeRun(db)
    receiver = new_pacs(db, work, processes, pg)
    client: PynetdicomClient | None = None
    try:
        print(f"[{db}] filling {len(plan.studies):,} studies / {plan.instance_count:,} instances ...", flush=True)
        run.fill = run_child(receiver.env, ["--child", "fill", "--studies", str(args.studies)], FILL_TIMEOUT)
        fill = run.fill
        print(
            f"[{db}] filled in {fill['fill_seconds']:.1f} s"
            + (f" (+ VACUUM ANALYZE {fill['analyze_seconds']:.1f} s)" if fill["analyze_seconds"] else "")
            + f": {fill['counts']}",
            flush=True,
        )
        expected = {
            "patients": len(plan.patients),
            "studies": len(plan.studies),
            "series": plan.series_count,
            "instances": plan.instance_count,
        }
        if fill["counts"] != expected:
            raise BenchError(f"the database holds {fill['counts']}, expected {expected}")
        print(f"[{db}] EXPLAIN and in-process timings ...", flush=True)
        payload = json.dumps([{"name": q.name, "level": q.level, "keys": q.keys} for q in queries])
        run.explain = run_child(
            receiver.env, ["--child", "explain", "--queries", payload, "--repeats", str(args.repeats)], CHILD_TIMEOUT
        )
        receiver.start()
        client = PynetdicomClient(receiver.ae_title, receiver.port)
        for q in queries:
            for name in ("pynetdicom", "findscu"):
                run.timings[(q.name, name)] = Timings()
        log_path = receiver.run_dir / "findscu.log"
        # One untimed round to warm up, then the repetitions, every query and client in
        # turn, so that a noisy moment on the machine does not hit one row only.
        for repeat in range(args.repeats + 1):
            for q in queries:
                for name in ("pynetdicom", "findscu"):
                    timings = run.timings[(q.name, name)]
                    if name == "pynetdicom":
                        measure_once(timings, q, repeat, lambda: client.find(q))
                    else:
                        measure_once(timings, q, repeat, lambda: findscu(q, receiver.ae_title, receiver.port, processes, log_path))
            if repeat == 0:
                print(f"[{db}] {args.repeats} repetitions of {len(queries)} queries x 2 clients ...", flush=True)
        for q in queries:
            for name in ("pynetdicom", "findscu"):
                t = run.timings[(q.name, name)]
                print(f"    {q.name:<40} {name:<10} median {fmt(t.median())} ms, p90 {fmt(t.p90())} ms"
                      + (f"  ERRORS: {t.errors[0]}" if t.errors else ""), flush=True)
    except (BenchError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        run.errors.append(str(exc))
        print(f"[{db}] ERROR\n{textwrap.indent(str(exc), '    ')}", flush=True)
    finally:
        if client is not None:
            client.close()
        drop(receiver)
    return run


# --------------------------------------------------------------------------- the small archive


SMALL_STUDIES = 20
SMALL_SERIES = 2
SMALL_INSTANCES = 3
SMALL_PREFIX = "SMITH*"
ECHO = "ECHO"  # the small archive's baseline row: a C-ECHO instead of a C-FIND
SMALL_PATIENTS = [
    ("S001", "Müller^Hans"), ("S002", "Müller^Anna"), ("S003", "Øster^Karin"), ("S004", "Yamada^Tarou=山田^太郎"),
    ("S005", "Smith^John"), ("S006", "Dubois^Émile"), ("S007", "García^María"), ("S008", "Nguyen^Minh"),
    ("S009", "Schmidt^Peter"), ("S010", "Jensen^Ole"), ("S011", "Rossi^Giulia"), ("S012", "Doe^Jane"),
]


def write_small_image(path: Path, modality: str, study_uid: str, series: int, number: int, **attributes: Any) -> Path:
    """Write one 16x16 image of ``modality`` (Part 10, Explicit VR Little Endian) as instance
    ``number`` of series ``series`` of ``study_uid``, with the patient and study
    ``attributes`` given (DICOM keywords)."""
    sop_uid = f"{study_uid}.{series}.{number}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.{series}"
    ds.Modality = modality
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(16 * 16 * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_corpus(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """Write the small archive: 20 studies of 2 series of 3 small images (pydicom, Part 10).
    Return the files and the expected answer counts of the small queries."""
    rng = random.Random(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    modalities = list(SOP_CLASSES)
    studies_of: dict[str, int] = {}
    for index in range(SMALL_STUDIES):
        patient_id, name = SMALL_PATIENTS[index % len(SMALL_PATIENTS)]
        studies_of[name] = studies_of.get(name, 0) + 1
        modality = modalities[index % len(modalities)]
        study_uid = f"{UID_ROOT}9.{index + 1}"
        date = FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS))
        for series in range(1, SMALL_SERIES + 1):
            for number in range(1, SMALL_INSTANCES + 1):
                day = date.strftime("%Y%m%d")
                path = folder / f"{index + 1:02d}-{series}-{number}.dcm"
                files.append(write_small_image(
                    path, modality, study_uid, series, number,
                    SpecificCharacterSet="ISO_IR 192", PatientID=patient_id, PatientName=name,
                    PatientBirthDate="19700101", PatientSex="F", AccessionNumber=f"S{index + 1:05d}",
                    StudyDate=day, SeriesDate=day, StudyTime="101500", SeriesTime="101500",
                    StudyDescription=rng.choice(DESCRIPTIONS[modality]), ReferringPhysicianName="Weber^Klaus",
                    StudyID=str(index + 1), SeriesDescription=f"{modality} series {series}",
                ))
    prefix = fold(SMALL_PREFIX.rstrip("*"))
    expected = {
        "all": SMALL_STUDIES,
        "name": sum(n for name, n in studies_of.items() if fold(name).startswith(prefix)),
    }
    return files, expected


def small_queries(expected: dict[str, int]) -> list[Query]:
    # An ASCII prefix: Orthanc matches names accent-sensitively (MULLER* finds no Müller
    # there), pacsportal does not; SMITH* has the same answers in both.
    return [
        Query("C-ECHO (echoscu: process and association only)", ECHO, {}, 0),
        Query("STUDY, all studies", "STUDY", study_keys(), expected["all"]),
        Query(f"STUDY, PatientName={SMALL_PREFIX}", "STUDY", study_keys(PatientName=SMALL_PREFIX), expected["name"]),
    ]


@dataclass
class SmallRun:
    """The small archive's results: (target label, query name) -> timings."""

    targets: list[str] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    timings: dict[tuple[str, str], Timings] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    files: int = 0


def store(files: list[Path], receiver: ingest.Receiver, processes: Processes) -> None:
    ingest.send(files, 1, receiver.ae_title, receiver.port, processes, receiver.run_dir)
    held = receiver.count()
    if held != len(files):
        raise BenchError(f"{receiver.config.receiver} holds {held} instances, expected {len(files)}")


def start_receivers(
    files: list[Path], dbs: list[str], work: Path, processes: Processes, pg: PostgresAdmin | None,
    receivers: list[tuple[str, ingest.Receiver]],
) -> None:
    """Start Orthanc and a pacsportal per database, each with ``files`` stored; appended to
    ``receivers`` as they start, so that the caller stops every one that did."""
    orthanc_dir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=work))
    orthanc = OrthancFind(Config("orthanc", 1), orthanc_dir, processes)
    receivers.append(("Orthanc", orthanc))
    orthanc.start()
    store(files, orthanc, processes)
    for db in dbs:
        pacs = new_pacs(db, work, processes, pg)
        receivers.append((f"pacsportal ({'PostgreSQL' if db == 'postgres' else 'SQLite'})", pacs))
        pacs.start()
        store(files, pacs, processes)


def print_medians(run: SmallRun, width: int) -> None:
    """Print each (query, target)'s median and p90 as the runs against Orthanc end."""
    for q in run.queries:
        for label in run.targets:
            t = run.timings[(label, q.name)]
            print(f"    {q.name:<{width}} {label:<24} median {fmt(t.median())} ms, p90 {fmt(t.p90())} ms"
                  + (f"  ERRORS: {t.errors[0]}" if t.errors else ""), flush=True)


def run_small(dbs: list[str], args: argparse.Namespace, work: Path, processes: Processes, pg: PostgresAdmin | None) -> SmallRun:
    """Store the small archive into Orthanc and pacsportal; time STUDY-level findscu against each."""
    run = SmallRun()
    files, expected = build_corpus(work / "corpus")
    run.files = len(files)
    queries = small_queries(expected)
    run.queries = queries
    receivers: list[tuple[str, ingest.Receiver]] = []
    try:
        start_receivers(files, dbs, work, processes, pg, receivers)
        print(f"[small] {len(files)} files stored in {', '.join(label for label, _ in receivers)}", flush=True)
        run.targets = [label for label, _ in receivers]
        for label, _ in receivers:
            for q in queries:
                run.timings[(label, q.name)] = Timings()
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for q in queries:
                for label, receiver in receivers:
                    timings = run.timings[(label, q.name)]
                    log_path = receiver.run_dir / "scu.log"
                    if q.level == ECHO:
                        measure_once(timings, q, repeat, lambda: echoscu(receiver.ae_title, receiver.port, processes, log_path))
                    else:
                        measure_once(timings, q, repeat, lambda: findscu(q, receiver.ae_title, receiver.port, processes, log_path))
        print_medians(run, 34)
    except (BenchError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        run.errors.append(str(exc))
        print(f"[small] ERROR\n{textwrap.indent(str(exc), '    ')}", flush=True)
    finally:
        for _, receiver in receivers:
            drop(receiver)
    return run


MANY_STUDIES = 318  # as many answers as the large archive's name-prefix query
MANY_PREFIX = "MANY*"


def build_many_corpus(folder: Path) -> list[Path]:
    """Write MANY_STUDIES studies of one small image each, all of patients named MANY^...:
    one STUDY-level query answers every one of them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(MANY_STUDIES):
        day = (FIRST_DAY + dt.timedelta(days=index)).strftime("%Y%m%d")
        files.append(write_small_image(
            folder / f"many-{index + 1:03d}.dcm", "CT", f"{UID_ROOT}8.{index + 1}", 1, 1,
            PatientID=f"M{index + 1:05d}", PatientName=f"MANY^Patient{index + 1}", PatientBirthDate="19700101",
            PatientSex="M", AccessionNumber=f"M{index + 1:05d}", StudyDate=day, SeriesDate=day,
            StudyTime="101500", SeriesTime="101500", StudyDescription="CT HEAD",
            ReferringPhysicianName="Weber^Klaus", StudyID=str(index + 1),
        ))
    return files


def run_many(dbs: list[str], args: argparse.Namespace, work: Path, processes: Processes, pg: PostgresAdmin | None) -> SmallRun:
    """The same 318-answer STUDY-level query against Orthanc and pacsportal, from pynetdicom
    (one association) and from findscu: what the client itself costs, with the server's
    part set beside a reference measured in the same run."""
    run = SmallRun()
    files = build_many_corpus(work / "many")
    run.files = len(files)
    query = Query(f"STUDY, PatientName={MANY_PREFIX}", "STUDY", study_keys(PatientName=MANY_PREFIX), MANY_STUDIES)
    run.queries = [
        Query(f"pynetdicom: {query.name}", query.level, query.keys, query.expected),
        Query(f"findscu: {query.name}", query.level, query.keys, query.expected),
    ]
    receivers: list[tuple[str, ingest.Receiver]] = []
    clients: list[PynetdicomClient] = []
    try:
        start_receivers(files, dbs, work, processes, pg, receivers)
        print(f"[many] {len(files)} studies stored in {', '.join(label for label, _ in receivers)}", flush=True)
        run.targets = [label for label, _ in receivers]
        for label, receiver in receivers:
            clients.append(PynetdicomClient(receiver.ae_title, receiver.port))
            for q in run.queries:
                run.timings[(label, q.name)] = Timings()
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for (label, receiver), client in zip(receivers, clients):
                for q in run.queries:
                    timings = run.timings[(label, q.name)]
                    if q.name.startswith("pynetdicom"):
                        measure_once(timings, q, repeat, lambda: client.find(q))
                    else:
                        log_path = receiver.run_dir / "scu.log"
                        measure_once(timings, q, repeat, lambda: findscu(q, receiver.ae_title, receiver.port, processes, log_path))
        print_medians(run, 40)
    except (BenchError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        run.errors.append(str(exc))
        print(f"[many] ERROR\n{textwrap.indent(str(exc), '    ')}", flush=True)
    finally:
        for client in clients:
            client.close()
        for _, receiver in receivers:
            drop(receiver)
    return run


# --------------------------------------------------------------------------- reporting


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def db_label(db: str) -> str:
    return "PostgreSQL" if db == "postgres" else "SQLite"


LARGE_HEADER = ["database", "query", "answers", "client", "median ms", "p90 ms", "engine ms", "encode ms", "target"]
SMALL_HEADER = ["archive", "query", "answers", "median ms", "p90 ms", "vs Orthanc", "paired, 95% interval"]


def large_rows(runs: list[LargeRun], queries: list[Query]) -> list[list[str]]:
    rows = []
    for run in runs:
        explained = {e["name"]: e for e in run.explain.get("queries", [])}
        for q in queries:
            for name in ("pynetdicom", "findscu"):
                t = run.timings.get((q.name, name), Timings())
                e = explained.get(q.name, {})
                median = t.median()
                if t.errors and not t.ms:
                    median_text = "FAILED"
                else:
                    median_text = fmt(median) + (" (!)" if t.errors else "")
                target = ""
                if q.target_ms is not None and run.db == "postgres":
                    verdict = "met" if median is not None and median <= q.target_ms else "NOT met"
                    target = f"<= {q.target_ms:.0f}: {verdict}"
                rows.append(
                    [
                        db_label(run.db),
                        q.name,
                        str(t.answers if t.answers is not None else q.expected),
                        name,
                        median_text,
                        fmt(t.p90()),
                        fmt(e.get("engine_ms")),
                        fmt(e.get("encode_ms")),
                        target,
                    ]
                )
    return rows


def small_rows(run: SmallRun) -> list[list[str]]:
    rows = []
    for name in (q.name for q in run.queries):
        orthanc = run.timings.get(("Orthanc", name), Timings())
        reference = orthanc.median()
        for label in run.targets:
            t = run.timings.get((label, name), Timings())
            median = t.median()
            ratio = "n/a" if median is None or not reference else f"{median / reference:.2f}x"
            paired = "" if label == "Orthanc" else paired_text(t, orthanc)
            rows.append([label, name, str(t.answers if t.answers is not None else ""), fmt(median), fmt(t.p90()), ratio, paired])
    return rows


def text_table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def markdown_table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LARGE_NUMERIC = {2, 4, 5, 6, 7}
SMALL_NUMERIC = {2, 3, 4, 5, 6}


def target_lines(runs: list[LargeRun], small: SmallRun, queries: list[Query]) -> list[str]:
    """The spec's targets, met or not, from this run's figures."""
    lines = []
    for run in runs:
        if run.db != "postgres":
            continue
        for q in queries:
            if q.target_ms is None:
                continue
            for name in ("pynetdicom", "findscu"):
                median = run.timings.get((q.name, name), Timings()).median()
                if median is None:
                    lines.append(f"- PostgreSQL, {q.name}, {name}: not measured")
                    continue
                verdict = "met" if median <= q.target_ms else "NOT met"
                lines.append(f"- PostgreSQL, {q.name}, {name}: median {median:.1f} ms, target <= {q.target_ms:.0f} ms: {verdict}")
    for label in small.targets:
        if label == "Orthanc":
            continue
        for q in small.queries:
            if q.level == ECHO:
                continue  # the baseline, not a target
            name = q.name
            t = small.timings.get((label, name), Timings())
            orthanc = small.timings.get(("Orthanc", name), Timings())
            reference = orthanc.median()
            median = t.median()
            if median is None or reference is None:
                lines.append(f"- small archive, {label}, {name}: not measured")
                continue
            verdict = "met" if median <= reference else "NOT met"
            lines.append(
                f"- small archive, {label}, {name}: {median:.1f} ms vs Orthanc {reference:.1f} ms "
                f"({median / reference:.2f}x), at least as fast as Orthanc: {verdict}{noise_note(t, orthanc)}"
            )
    return lines


def noise_note(timings: Timings, reference: Timings) -> str:
    """Whether the paired ratio's interval leaves 1.0x out, for a target's line."""
    paired = paired_ratio(timings, reference)
    if paired is None:
        return ""
    median, low, high = paired
    where = noise_words(paired, higher_is_better=False)
    return f" (paired by round: {median:.2f}x, 95% interval {low:.2f}-{high:.2f}x: {where})"


def many_target_lines(many: SmallRun) -> list[str]:
    """The 318-answer query: pacsportal against Orthanc with each client, and the client's own share."""
    lines = []
    for label in many.targets:
        if label == "Orthanc":
            continue
        for q in many.queries:
            t = many.timings.get((label, q.name), Timings())
            orthanc = many.timings.get(("Orthanc", q.name), Timings())
            median, reference = t.median(), orthanc.median()
            if median is None or reference is None:
                lines.append(f"- {MANY_STUDIES} answers, {label}, {q.name}: not measured")
                continue
            lines.append(
                f"- {MANY_STUDIES} answers, {label}, {q.name}: {median:.1f} ms vs Orthanc {reference:.1f} ms "
                f"({median / reference:.2f}x), at least as fast as Orthanc: {'met' if median <= reference else 'NOT met'}"
                f"{noise_note(t, orthanc)}"
            )
    return lines


def explain_lines(runs: list[LargeRun], markdown: bool) -> list[str]:
    """Each query's plan and whether it uses an index, per database."""
    lines: list[str] = []
    for run in runs:
        for e in run.explain.get("queries", []):
            if e["full_scans"]:
                scans = ", ".join(e["full_scans"])
                verdict = ("index used" if e["index_used"] else "FULL SCAN of a big table") + f"; full scans: {scans}"
            else:
                verdict = "index used, no full scan" if e["indexes"] else "no index"
            title = f"{db_label(run.db)}, {e['name']}: {verdict} (indexes: {', '.join(e['indexes']) or 'none'})"
            if markdown:
                lines += [f"- {title}", "", "  ```", *(f"  {line}" for line in e["plan"]), "  ```", ""]
            else:
                lines += [title, *(f"    {line}" for line in e["plan"]), ""]
    return lines


def data_lines(plan: ArchivePlan, runs: list[LargeRun]) -> list[str]:
    lines = [
        f"- large archive: {len(plan.patients):,} patients, {len(plan.studies):,} studies "
        f"({FIRST_DAY:%Y-%m-%d} to {FIRST_DAY + dt.timedelta(days=DAYS - 1):%Y-%m-%d}), "
        f"{plan.series_count:,} series, {plan.instance_count:,} instances (one series of {KNOWN_SERIES_SIZE})"
    ]
    for run in runs:
        if run.fill:
            analyze = f" + VACUUM ANALYZE {run.fill['analyze_seconds']:.1f} s" if run.fill["analyze_seconds"] else ""
            lines.append(f"- fill ({db_label(run.db)}, bulk_create in batches of {BATCH:,}): "
                         f"{run.fill['fill_seconds']:.1f} s{analyze}")
    return lines


def write_markdown(
    path: Path,
    args: argparse.Namespace,
    plan: ArchivePlan,
    runs: list[LargeRun],
    small: SmallRun,
    queries: list[Query],
    many: SmallRun,
) -> None:
    errors = [f"- {db_label(r.db)}: {e}" for r in runs for e in r.errors] + [f"- small archive: {e}" for e in small.errors]
    errors += [
        f"- {db_label(r.db)}, {name}, {client}: {e}" for r in runs for (name, client), t in r.timings.items() for e in t.errors[:3]
    ]
    errors += [f"- small archive, {label}, {name}: {e}" for (label, name), t in small.timings.items() for e in t.errors[:3]]
    errors += [f"- {MANY_STUDIES} answers: {e}" for e in many.errors]
    errors += [f"- {MANY_STUDIES} answers, {label}, {name}: {e}" for (label, name), t in many.timings.items() for e in t.errors[:3]]
    text = [
        f"# Query (C-FIND) benchmark, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/query.py', *sys.argv[1:]])}`",
        "",
        *data_lines(plan, runs),
        f"- small archive: {SMALL_STUDIES} studies, {small.files} files of 16x16 pixels, stored with storescu",
        f"- {args.repeats} repetitions per row after one warm-up round; end to end from the client's side: "
        "pynetdicom over one association (TCP_NODELAY), findscu a process per query (TCP_NODELAY=1, "
        "process start to exit)",
        "- engine ms: `archive.query.find` in one process (SQL and answers); encode ms: "
        "the SCP's `encode_answer` of every answer, Explicit VR Little Endian (medians)",
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}; "
        f"load average at the start {args.load_start}, at the end {ingest.load_average()}",
        f"- Python {platform.python_version()}, pydicom {pydicom.__version__}, pynetdicom {pynetdicom.__version__}, "
        f"{ingest.tool_version(['findscu', '--version'])}, {ingest.tool_version([ORTHANC_BINARY, '--version'])}",
        "",
        "## Large archive",
        "",
        markdown_table(LARGE_HEADER, large_rows(runs, queries), LARGE_NUMERIC),
        "",
        "## Small archive against Orthanc (findscu, STUDY level)",
        "",
        markdown_table(SMALL_HEADER, small_rows(small), SMALL_NUMERIC),
        "",
        f"## {MANY_STUDIES} answers against Orthanc (pynetdicom and findscu, STUDY level)",
        "",
        f"{MANY_STUDIES} studies of one 16x16 image each, all of patients named MANY^...; the same query "
        "from a pynetdicom client (one association) and from findscu, against Orthanc and pacsportal.",
        "",
        markdown_table(SMALL_HEADER, small_rows(many), SMALL_NUMERIC),
        "",
        "## Targets",
        "",
        *target_lines(runs, small, queries),
        *many_target_lines(many),
        "",
        "## EXPLAIN",
        "",
        *explain_lines(runs, markdown=True),
    ]
    if errors:
        text += ["## Errors", "", *(e.replace("\n", " ") for e in errors)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--db", choices=["sqlite", "postgres", "both"], default="both", help="pacsportal's database (default: both)"
    )
    parser.add_argument(
        "--studies",
        type=int,
        default=FULL_STUDIES,
        help=f"studies in the large archive, {INSTANCES_PER_STUDY} instances each on average (default: {FULL_STUDIES:,})",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_STUDIES:,} studies / {QUICK_STUDIES * INSTANCES_PER_STUDY:,} instances"
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"timed repetitions per row (default: {REPEATS})")
    parser.add_argument("--pg-admin-url", default=ingest.DEFAULT_PG_ADMIN_URL, help="where to create the throw-away databases")
    parser.add_argument(
        "--parts",
        default="large,small,many",
        help="which parts to run, comma-separated: large, small, many (default: all three)",
    )
    # Internal: the parts that run inside Django, in a child process with the receiver's environment.
    parser.add_argument("--child", choices=["fill", "explain"], help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    parser.add_argument("--no-instances", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.studies = QUICK_STUDIES
    if args.studies < 20:
        parser.error("--studies must be at least 20")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not args.parts or args.parts - {"large", "small", "many"}:
        parser.error("--parts takes large, small and many, comma-separated")
    args.load_start = ingest.load_average()
    return args


def check_tools() -> None:
    missing = [tool for tool in ("findscu", "storescu", "echoscu") if shutil.which(tool) is None]
    if not Path(ORTHANC_BINARY).is_file():
        missing.append(ORTHANC_BINARY)
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (install the dcmtk and orthanc packages)")


def child_main(args: argparse.Namespace) -> int:
    if args.child == "fill":
        result = child_fill(args.studies, with_instances=not args.no_instances)
    else:
        result = child_explain(json.loads(args.queries), args.repeats)
    print(json.dumps(result, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            return child_main(args)
        except KeyboardInterrupt:
            return 130  # Ctrl-C reached the whole process group: the parent reports it
    check_tools()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, ingest.raise_terminated)
    processes = Processes()
    pg: PostgresAdmin | None = None
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-query-"))
    started = time.perf_counter()
    try:
        dbs = ["postgres", "sqlite"] if args.db == "both" else [args.db]
        if "postgres" in dbs:
            pg = PostgresAdmin(args.pg_admin_url)
        plan = build_plan(args.studies)
        queries = large_queries(plan)
        print(
            f"large archive: {len(plan.patients):,} patients, {len(plan.studies):,} studies, "
            f"{plan.series_count:,} series, {plan.instance_count:,} instances; expected answers: "
            + ", ".join(f"{q.name} {q.expected}" for q in queries),
            flush=True,
        )
        runs = [run_large(db, args, plan, queries, work, processes, pg) for db in dbs] if "large" in args.parts else []
        small = run_small(dbs, args, work, processes, pg) if "small" in args.parts else SmallRun()
        many = run_many(dbs, args, work, processes, pg) if "many" in args.parts else SmallRun()

        if runs:
            print()
            print(text_table(LARGE_HEADER, large_rows(runs, queries), LARGE_NUMERIC))
        if small.queries:
            print()
            print(text_table(SMALL_HEADER, small_rows(small), SMALL_NUMERIC))
        if many.queries:
            print()
            print(text_table(SMALL_HEADER, small_rows(many), SMALL_NUMERIC))
        print()
        print("\n".join(data_lines(plan, runs)))
        print()
        print("\n".join(target_lines(runs, small, queries) + many_target_lines(many)))
        print()
        print("\n".join(explain_lines(runs, markdown=False)))
        out = RESULTS_DIR / f"query-{time.strftime('%Y%m%d-%H%M%S')}.md"
        write_markdown(out, args, plan, runs, small, queries, many)
        print(f"written to {out.relative_to(ROOT)} (total {time.perf_counter() - started:.0f} s)")
        failed = any(r.errors for r in runs) or small.errors or many.errors
        failed = failed or any(t.errors for r in runs for t in r.timings.values())
        failed = failed or any(t.errors for run in (small, many) for t in run.timings.values())
        if failed:
            print("some measurements failed or gave wrong answer counts; see above", file=sys.stderr)
            return 1
        return 0
    except (KeyboardInterrupt, Terminated):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        ingest.clean_up(processes, pg, work)


if __name__ == "__main__":
    sys.exit(main())
