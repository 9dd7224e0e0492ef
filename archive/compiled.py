"""The query engine's SQL, compiled once per shape of query.

Django builds and compiles a query anew every time: for a small C-FIND (a name prefix, a
few return keys) that is most of the answer's time in the engine, some 0.5 ms of Python
hot and twice that in a new association's thread, while the database needs 0.05-0.5 ms
for it. Queries come in few shapes (the same keys with the same kinds of matching: a
modality asks for today's worklist, a workstation for a name prefix), so the SQL of a
shape is kept, and a query of a known shape only computes its parameters.

A shape is what makes the SQL text: the level, the returned columns, the ordering and the
limit, the database, and the conditions' tree with, for each leaf, its field lookup and the
type (and length, for lists) of its value. Its template is learnt from a copy of the query
whose values are replaced by sentinels: the ``WHERE`` leaves (Django's lookups, in the
order they compile) that hold a sentinel are the slots where a later query's values go;
the template is kept only when the query's parameters are exactly its leaves' parameters,
in that order. A query of a known shape then compiles each slot's lookup with its own
value (Django's own lookup class, so its value is prepared and escaped as Django does) and
checks that the lookup compiles to the same SQL as in the template; anything else, and it
is built and compiled the usual way.

On PostgreSQL a kept shape's SQL runs as a prepared statement (``execute``).

Only queries over everything the model holds are compiled this way: a query narrowed to a
caller's scope (``access``) always goes through Django. The scope is a security boundary,
and keeping it out of the cache keeps one caller's SQL from ever serving another's.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Q, QuerySet
from django.db.models.lookups import Lookup
from django.db.models.sql.where import WhereNode

# Value types a leaf may hold (and lists of them); a query with anything else (an
# expression, a subquery) is not kept.
_PLAIN = (str, int, float, dt.date, dt.time)
_LIMIT = 256  # shapes kept; beyond, the oldest goes


def unrestricted(queryset: QuerySet) -> QuerySet:
    """Mark ``queryset`` (``Model.objects.all()``) as everything the model holds, for
    ``find``: only such a query may be compiled once per shape. The mark does not survive
    a ``filter`` or any other clone."""
    queryset._pacs_unrestricted = True  # type: ignore[attr-defined]
    return queryset


def is_unrestricted(queryset: QuerySet | None) -> bool:
    return queryset is not None and getattr(queryset, "_pacs_unrestricted", False) is True


@dataclass(frozen=True)
class _Slot:
    sql: str  # the lookup's SQL in the template
    params: tuple  # its parameters (kept for a constant leaf)
    lookup: Lookup | None  # the template's lookup, for a leaf that takes a query's value
    leaf: int | None  # which value of the query's conditions it takes


@dataclass(frozen=True)
class _Template:
    sql: str
    slots: tuple[_Slot, ...]
    names: tuple[str, ...]  # the columns' names, as ``values()`` gives them
    expressions: tuple[Any, ...]  # the selected expressions, for their converters
    query: Any  # the template's Query, for a compiler of the slots' lookups


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    fallbacks: int = 0  # a known shape whose values compiled to other SQL


stats = Stats()
_templates: dict[tuple, _Template | None] = {}  # None: a shape that cannot be kept
_lock = threading.Lock()


def clear() -> None:
    with _lock:
        _templates.clear()


def _leaves(q: Q, values: list[Any]) -> tuple | None:
    """The shape of a condition tree, its values appended to ``values`` in order; None
    when a leaf is not a (lookup, plain value) pair."""
    children = []
    for child in q.children:
        if isinstance(child, Q):
            shape = _leaves(child, values)
            if shape is None:
                return None
            children.append(shape)
            continue
        if not (isinstance(child, tuple) and len(child) == 2 and isinstance(child[0], str)):
            return None
        lookup, value = child
        if isinstance(value, (list, tuple)):
            if not value or not all(type(v) in _PLAIN for v in value):
                return None
            children.append((lookup, tuple(type(v).__name__ for v in value)))
        elif type(value) in _PLAIN:
            children.append((lookup, type(value).__name__))
        else:
            return None
        values.append(value)
    return (q.connector, q.negated, tuple(children))


def _sentinel(index: int, value: Any) -> Any:
    """A value of ``value``'s type that no query holds, distinct for each ``index``."""
    kind = type(value)
    if kind is str:
        return f"\x1fpacs-sentinel-{index}\x1f"
    if kind is int:  # within a small integer column's range: out of it, Django drops the condition
        return 7_919 + index
    if kind is float:
        return 7_919.5 + index
    if kind is dt.date:
        return dt.date(1111, 1, 1) + dt.timedelta(days=index)
    return dt.time(index // 3600 % 24, index // 60 % 60, index % 60, 654_321)


def _with_values(q: Q, values: Iterator[Any]) -> Q:
    """A copy of ``q`` with its leaves' values taken from ``values`` in order."""
    children = []
    for child in q.children:
        if isinstance(child, Q):
            children.append(_with_values(child, values))
        else:
            children.append((child[0], next(values)))
    return Q(*children, _connector=q.connector, _negated=q.negated)


def _where_leaves(node: WhereNode) -> Iterator[Any]:
    """The leaves of a WHERE tree in the order they compile (``WhereNode.as_sql``)."""
    for child in node.children:
        if isinstance(child, WhereNode):
            yield from _where_leaves(child)
        else:
            yield child


def fetch(
    key: tuple, filters: Q, base: QuerySet | None, build: Callable[[Q], QuerySet]
) -> list[dict[str, Any]]:
    """The rows of ``build(filters)``, a ``values()`` query over ``base``; ``key`` names
    everything of its shape but its conditions (level, columns, ordering, limit)."""
    values: list[Any] = []
    shape = _leaves(filters, values) if is_unrestricted(base) else None
    if shape is None:
        return list(build(filters))
    alias = base.db  # type: ignore[union-attr]
    full_key = (alias, connections[alias].vendor, key, shape)
    template = _templates.get(full_key, False)
    if template:
        rows = _run(template, values, alias)
        if rows is not None:
            stats.hits += 1
            return rows
        stats.fallbacks += 1
    elif template is False:
        stats.misses += 1
        learnt = _learn(filters, values, build)
        with _lock:
            if len(_templates) >= _LIMIT:
                _templates.pop(next(iter(_templates)))
            _templates[full_key] = learnt
    return list(build(filters))


def _learn(filters: Q, values: list[Any], build: Callable[[Q], QuerySet]) -> _Template | None:
    """The template of a shape, from a copy of the query with sentinel values; None when
    the query's parameters are not exactly its lookups' (then it is never kept)."""
    count = itertools.count()
    sentinels = [
        [_sentinel(next(count), v) for v in value] if isinstance(value, (list, tuple)) else _sentinel(next(count), value)
        for value in values
    ]
    queryset = build(_with_values(filters, iter(sentinels)))
    query = queryset.query
    compiler = query.get_compiler(queryset.db)
    try:
        sql, params = compiler.as_sql()
    except Exception:  # noqa: BLE001 - an empty or full result, say: not a shape to keep
        return None
    slots = []
    flat: list[Any] = []
    used = set()
    for leaf in _where_leaves(query.where):
        if not isinstance(leaf, Lookup):
            return None
        try:
            leaf_sql, leaf_params = compiler.compile(leaf)
        except Exception:  # noqa: BLE001
            return None
        index = next((i for i, s in enumerate(sentinels) if _holds(leaf.rhs, s)), None)
        if index is None and any(_mentions(leaf.rhs, s) for s in sentinels):
            return None  # a sentinel in a form we cannot map back
        used.add(index)
        slots.append(_Slot(leaf_sql, tuple(leaf_params), leaf if index is not None else None, index))
        flat.extend(leaf_params)
    if list(params) != flat or used - {None} != set(range(len(sentinels))):
        return None
    if any(isinstance(s, str) and s in sql for s in _flat(sentinels)):
        return None  # a value written into the text
    names = (*query.extra_select, *query.values_select, *query.annotation_select)
    expressions = tuple(column[0] for column in compiler.select[: compiler.col_count])
    if len(names) != len(expressions):
        return None
    return _Template(sql, tuple(slots), names, expressions, query)


def _flat(sentinels: list[Any]) -> Iterator[Any]:
    for s in sentinels:
        yield from (s if isinstance(s, list) else [s])


def _holds(rhs: Any, sentinel: Any) -> bool:
    if isinstance(sentinel, list):
        return isinstance(rhs, (list, tuple)) and list(rhs) == sentinel
    return type(rhs) is type(sentinel) and rhs == sentinel


def _mentions(rhs: Any, sentinel: Any) -> bool:
    items = rhs if isinstance(rhs, (list, tuple, set)) else [rhs]
    wanted = sentinel if isinstance(sentinel, list) else [sentinel]
    return any(type(item) is type(s) and item == s for item in items for s in wanted)


def _run(template: _Template, values: list[Any], alias: str) -> list[dict[str, Any]] | None:
    """The rows of a query of ``template``'s shape with ``values``; None when one of its
    lookups compiles to other SQL with these values."""
    connection = connections[alias]
    compiler = template.query.get_compiler(connection=connection)
    params: list[Any] = []
    for slot in template.slots:
        if slot.lookup is None:
            params.extend(slot.params)
            continue
        try:
            lookup = type(slot.lookup)(slot.lookup.lhs, values[slot.leaf])  # type: ignore[index]
            sql, leaf_params = compiler.compile(lookup)
        except Exception:  # noqa: BLE001 - a value Django refuses or compiles otherwise: its way says so
            return None
        if sql != slot.sql:
            return None
        params.extend(leaf_params)
    converters = []
    for position, expression in enumerate(template.expressions):
        functions = connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
        if functions:
            converters.append((position, functions, expression))
    rows = execute(connection, template.sql, params)
    names = template.names
    result = []
    for row in rows:
        if converters:
            row = list(row)
            for position, functions, expression in converters:
                value = row[position]
                for function in functions:
                    value = function(value, expression, connection)
                row[position] = value
        result.append(dict(zip(names, row)))
    return result


def execute(connection, sql: str, params: list[Any]) -> list[tuple]:
    """The rows of ``sql`` run with ``params`` (a kept query shape here, the ingest's one
    statement in ``archive.ingest``). On PostgreSQL, a prepared statement
    with the values bound by the server (psycopg's own cursor, under Django's error
    translation; Django's cursor would write the values into the text): the statement is
    parsed once per connection, and once PostgreSQL sees that its generic plan costs no
    more than the plans made for each query's values, planned once too. Where the settings
    turn psycopg's prepared statements off (``PACS_DB_PREPARED_STATEMENTS``), psycopg
    executes it unprepared."""
    if connection.vendor == "postgresql":
        from psycopg import Cursor

        connection.ensure_connection()
        with connection.wrap_database_errors, Cursor(connection.connection) as cursor:
            cursor.execute(sql, params, prepare=True)
            return cursor.fetchall()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()
