"""django-q2 entry points of the archive (arguments are primary keys, never model instances)."""

from __future__ import annotations

import logging

from django_q.tasks import async_task

from archive import render, slices
from archive.models import Instance, Series

log = logging.getLogger("archive.tasks")


def prerender_series(series_id: int) -> int:
    """Fill the render cache for a series: every frame's preview and packed renditions, and
    the thumbnail of the middle instance (the one the study page shows). Returns how many
    renditions were made; instances that cannot be rendered are logged and skipped."""
    series = Series.objects.filter(pk=series_id).first()
    if series is None:
        return 0  # deleted since
    instances = Instance.objects.filter(series_id=series_id).only(*render.RENDER_FIELDS).order_by("instance_number", "pk")
    made = 0
    for instance in instances:
        try:
            made += render.render_all(instance)
        except render.RenderError as exc:
            log.info("instance %s of series %s not rendered: %s", instance.pk, series_id, exc)
    middle = render.series_representative(series_id)
    if middle is not None and not render.cache_path(middle, 1, "thumbnail").exists():
        try:
            render.rendition(middle, 1, "thumbnail")
            made += 1
        except render.RenderError:
            pass
    slices.series_slices(series)  # the viewer's slice list: opening the series reads one file
    return made


def queue_prerender(sender: object, series_ids: list[int], **kwargs: object) -> None:
    """``series_received`` receiver: queue one pre-render task per series."""
    for series_id in series_ids:
        async_task("archive.tasks.prerender_series", series_id, group="prerender", task_name=f"prerender-{series_id}")
