"""A series as the viewer shows it: every frame a slice, in anatomical order, with what the
viewer needs to show and window each one (``render.image_info``), cached beside the renditions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Count, Max

from archive import render
from archive.models import Instance, Series

log = logging.getLogger("archive.render")


def series_slices(series: Series) -> list[dict[str, Any]]:
    """Every frame of a series as a slice for the viewer, in anatomical order (cached).

    The list is kept beside the rendered images, keyed by the series and its instances
    (count and newest row: a stored or replaced instance makes a new key), so that opening
    a series reads one small file instead of every instance's header.
    """
    stamp = Instance.objects.filter(series=series).aggregate(n=Count("pk"), last=Max("pk"))
    path = Path(settings.PACS_RENDER_CACHE_DIR) / "slices" / f"{series.pk}-{stamp['n']}-{stamp['last']}-v{render.RENDER_VERSION}.json"
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        pass
    slices = _series_slices(series)
    try:
        render.write_atomic(path, json.dumps(slices).encode())
    except OSError as exc:
        log.warning("cannot cache the slice list of series %s: %s", series.pk, exc)
    return slices


def _series_slices(series: Series) -> list[dict[str, Any]]:
    """Every frame of a series as a slice for the viewer, in anatomical order.

    Slices are ordered by their position along the slice normal (the cross product of the
    row and column directions of ImageOrientationPatient, PS3.3 C.7.6.2.1.1) when every
    slice has a position and they share one orientation; otherwise by InstanceNumber, then
    frame number.
    """
    instances = Instance.objects.filter(series=series).only(
        "pk", "sop_instance_uid", "file_sha256", "instance_number", "number_of_frames", "metadata", "file_path"
    )
    slices: list[dict[str, Any]] = []
    for instance in instances:
        info = render.image_info(instance.metadata, instance)
        version = render.etag(instance, 1, "v")[1:13]
        for frame in range(1, (info["frames"] or 1) + 1):
            positions = info["positions"]
            position = positions[frame - 1] if frame - 1 < len(positions) else (positions[0] if len(positions) == 1 else None)
            slices.append(
                {
                    "sop": instance.sop_instance_uid,
                    "frame": frame,
                    "version": version,
                    "instance_number": info["instance_number"],
                    "rows": info["rows"],
                    "columns": info["columns"],
                    "colour": info["colour"],
                    "invert": info["invert"],
                    "packed": info["packed"],
                    "signed": info["signed"],
                    "slope": info["slope"],
                    "intercept": info["intercept"],
                    "windows": info["windows"],
                    "pixel_spacing": info["pixel_spacing"],
                    "spacing_source": info["spacing_source"],
                    "orientation": info["orientation"],
                    "position": position,
                    "slice_thickness": info["slice_thickness"],
                    "slice_location": info["slice_location"],
                    "frames": info["frames"],
                }
            )
    slices.sort(key=_slice_order(slices))
    return slices


def _slice_order(slices: list[dict[str, Any]]):
    orientations = {tuple(round(v, 4) for v in s["orientation"]) for s in slices if s["orientation"]}
    if len(orientations) == 1 and all(s["position"] for s in slices) and len(slices) > 1:
        row, column = list(orientations)[0][:3], list(orientations)[0][3:]
        normal = (
            row[1] * column[2] - row[2] * column[1],
            row[2] * column[0] - row[0] * column[2],
            row[0] * column[1] - row[1] * column[0],
        )
        if math.isclose(sum(n * n for n in normal), 1.0, rel_tol=0.05):
            return lambda s: (sum(p * n for p, n in zip(s["position"], normal)), s["instance_number"] or 0, s["frame"])
    return lambda s: (s["instance_number"] is None, s["instance_number"] or 0, s["sop"], s["frame"])
