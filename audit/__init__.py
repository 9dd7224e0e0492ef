"""The audit log. ``audit.record(...)`` appends an event (see ``audit.services.record``)."""


def record(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - a thin alias, documented in services
    from audit.services import record as _record

    return _record(*args, **kwargs)
