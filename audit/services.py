"""``record``: the one writer of audit events (``audit.record`` is this function).

Views, viewsets and protocol handlers call it once per access: one event for a search, one
for opening a study (not one per image the viewer loads), one per DICOM association's
queries or retrievals. An event is written whole or not at all, chained to the one before
(``AuditEvent.hash``). Writers are serialized: an advisory lock on PostgreSQL (taken, with
the read of the last hash and the insert, in one database function: one round trip), SQLite's
write lock (IMMEDIATE transactions) otherwise.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection, transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.models import AuditEvent

GENESIS = "0" * 64
_LOCK_KEY = 0x7061_6373  # "pacs": the advisory lock that orders the chain on PostgreSQL
Action = AuditEvent.Action
Outcome = AuditEvent.Outcome
Channel = AuditEvent.Channel


def record(
    action: str,
    *,
    channel: str,
    request: HttpRequest | None = None,
    user: AbstractBaseUser | AnonymousUser | None = None,
    actor: str = "",
    source_address: str = "",
    outcome: str = Outcome.SUCCESS,
    patient_id: str = "",
    study_instance_uid: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit event and return it.

    The actor is ``user`` (or the request's user); for DIMSE, pass ``actor`` (the calling AE
    title) and ``source_address``. The address and user agent come from ``request`` when
    given. Raises what the database raises: an access whose audit cannot be written fails.
    """
    if request is not None:
        user = user if user is not None else getattr(request, "user", None)
        source_address = source_address or request.META.get("REMOTE_ADDR", "")
    known = user if user is not None and user.is_authenticated else None
    event = AuditEvent(
        time=timezone.now(),
        user=known,
        actor=(actor or (known.get_username() if known else getattr(user, "username", "") or "anonymous"))[:150],
        role=roles_of(known) if known else "",
        action=action,
        channel=channel,
        outcome=outcome,
        patient_id=(patient_id or "")[:64],
        study_instance_uid=(study_instance_uid or "")[:64],
        source_address=(source_address or "")[:64],
        user_agent=(request.META.get("HTTP_USER_AGENT", "") if request is not None else "")[:256],
        details=details or {},
    )
    if connection.vendor == "postgresql":
        _append_postgresql(event)
    else:
        _append_sqlite(event)
    return event


# The columns written, in statement order (the primary key comes back from the insert).
_COLUMNS = (
    "time", "user", "actor", "role", "action", "channel", "outcome", "patient_id", "study_instance_uid",
    "source_address", "user_agent", "details", "previous_hash", "hash",
)


@functools.cache
def _sqlite_statements() -> tuple[str, str, tuple]:
    """(read the last hash, insert an event, the inserted fields), built once."""
    meta, quote = AuditEvent._meta, connection.ops.quote_name
    fields = tuple(meta.get_field(name) for name in _COLUMNS)
    last = f"SELECT {quote('hash')} FROM {quote(meta.db_table)} ORDER BY {quote(meta.pk.column)} DESC LIMIT 1"
    insert = "INSERT INTO {} ({}) VALUES ({}) RETURNING {}".format(
        quote(meta.db_table), ", ".join(quote(f.column) for f in fields), ", ".join("%s" for _ in fields), quote(meta.pk.column)
    )
    return last, insert, fields


def _append_sqlite(event: AuditEvent) -> None:
    """Read the last hash and insert, in one IMMEDIATE transaction (it holds SQLite's write
    lock from its start, so no other writer comes between). Plain SQL: the ORM's insert
    costs more than the statement itself, and every access pays for it."""
    last, insert, fields = _sqlite_statements()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(last)
        row = cursor.fetchone()
        event.previous_hash = row[0] if row else GENESIS
        event.hash = event.compute_hash(event.previous_hash)
        cursor.execute(insert, [f.get_db_prep_save(getattr(event, f.attname), connection) for f in fields])
        event.pk = cursor.fetchone()[0]
    event._state.adding = False
    event._state.db = connection.alias


def _append_postgresql(event: AuditEvent) -> None:
    """Chain and insert in one round trip (the ``audit_append`` function, migration 0003)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, previous_hash, hash FROM audit_append(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)",
            [
                _LOCK_KEY, event.time, event.user_id, event.actor, event.role, event.action, event.channel,
                event.outcome, event.patient_id, event.study_instance_uid, event.source_address, event.user_agent,
                json.dumps(event.details, default=str), event.body(),
            ],
        )
        event.pk, event.previous_hash, event.hash = cursor.fetchone()
    event._state.adding = False
    event._state.db = connection.alias


def roles_of(user: AbstractBaseUser) -> str:
    """The user's group names (kept on the user object for the request's other events)."""
    cached = getattr(user, "_audit_roles", None)
    if cached is None:
        names = sorted(user.groups.values_list("name", flat=True)) if hasattr(user, "groups") else []
        if getattr(user, "is_superuser", False):
            names.insert(0, "superuser")
        cached = ",".join(names)
        user._audit_roles = cached
    return cached


def verify_chain() -> tuple[int, str | None]:
    """Walk the chain in order; return (events checked, description of the first break or None)."""
    previous = GENESIS
    checked = 0
    for event in AuditEvent.objects.order_by("pk").iterator(chunk_size=2000):
        if event.previous_hash != previous:
            return checked, (
                f"event #{event.pk} ({event.time:%Y-%m-%d %H:%M:%S} {event.action} by {event.actor}) does not follow "
                "the event before it: an event was removed, inserted or changed before it"
            )
        if event.compute_hash(previous) != event.hash:
            return checked, (
                f"event #{event.pk} ({event.time:%Y-%m-%d %H:%M:%S} {event.action} by {event.actor}) "
                "was changed after it was written: its content does not match its hash"
            )
        previous = event.hash
        checked += 1
    return checked, None
