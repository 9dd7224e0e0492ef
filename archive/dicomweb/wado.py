"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): instances, metadata, frames, bulk data,
rendered images and thumbnails, through the retrieve and render services.

Instances go out as stored when the client accepts any transfer syntax
(``transfer-syntax=*``) or the stored one; otherwise as Explicit VR Little Endian, decoded
when compressed. Metadata comes from the stored DICOM JSON headers (no file is opened),
gzipped when the client accepts it. Frames are native little-endian pixel bytes
(application/octet-stream), or the stored compressed bitstream when the Accept header asks
for its image type.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pydicom
from django.db.models import TextField
from django.db.models.functions import Cast
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import reverse
from django.views.decorators.gzip import gzip_page
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

import audit
from archive import access, render, retrieve, storage
from archive.dicomweb import multipart
from archive.dicomweb.auth import dicomweb_view
from archive.models import Instance

CHUNK = 1024 * 1024
# Media types of compressed frames, by transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


def _instances(request: HttpRequest, action: str, study: str, series: str | None = None, sop: str | None = None):
    rows = access.instances_for(request.user, action).filter(series__study__study_instance_uid=study)
    if series:
        rows = rows.filter(series__series_instance_uid=series)
    if sop:
        rows = rows.filter(sop_instance_uid=sop)
    return rows.order_by("series__series_number", "series_id", "instance_number", "pk")


def _audit(request: HttpRequest, action: str, study: str, details: dict) -> None:
    from archive.models import Study

    patient = Study.objects.filter(study_instance_uid=study).values_list("patient__patient_id", flat=True).first() or ""
    audit.record(action, channel="dicomweb", request=request, patient_id=patient, study_instance_uid=study, details=details)


def _study_url(request: HttpRequest, study: str) -> str:
    return request.build_absolute_uri(reverse("dicomweb:studies")) + f"/{study}"


# ------------------------------------------------------------------------- instances


def _wanted_syntax(request: HttpRequest) -> str | None:
    """The transfer syntax asked for: "*" (as stored), a UID, or None (Explicit VR Little Endian).
    Raises Http406Error when the Accept header asks for something else than DICOM."""
    ranges = multipart.accept_ranges(request.headers.get("Accept", ""))
    if not ranges:
        return None
    for media, params in ranges:
        part_type = params.get("type", "").lower()
        if media in ("multipart/related", "*/*", "multipart/*") and part_type in ("", "application/dicom"):
            return params.get("transfer-syntax") or None
        if media == "application/dicom":
            return params.get("transfer-syntax") or None
    raise NotAcceptable("only multipart/related; type=\"application/dicom\" is offered here")


class NotAcceptable(Exception):
    pass


def _dicom_parts(items: list[retrieve.StoredInstance], wanted: str | None) -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
    for item in items:
        stored = UID(item.transfer_syntax_uid)
        if wanted == "*" or wanted == stored or (wanted in (None, ExplicitVRLittleEndian) and stored == ExplicitVRLittleEndian):
            yield {"Content-Type": f"application/dicom; transfer-syntax={stored}"}, _file_chunks(item)
            continue
        try:
            ds = retrieve.load(item, [ExplicitVRLittleEndian])
            out = io.BytesIO()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
        except retrieve.RetrieveError:
            continue  # not transcodable: left out of the answer (the count header says so)
        yield {"Content-Type": f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"}, iter([out.getvalue()])


def _file_chunks(item: retrieve.StoredInstance) -> Iterator[bytes]:
    with open(storage.absolute(item.file_path), "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _retrieve(request: HttpRequest, study: str, series: str | None, sop: str | None) -> HttpResponse:
    try:
        wanted = _wanted_syntax(request)
    except NotAcceptable as exc:
        return JsonResponse({"error": str(exc)}, status=406)
    if wanted not in (None, "*", ExplicitVRLittleEndian) and not pydicom.uid.UID(wanted).is_valid:
        return JsonResponse({"error": f"unknown transfer syntax {wanted[:64]!r}"}, status=406)
    rows = _instances(request, "images", study, series, sop).values_list(
        "pk", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "file_path"
    )
    items = [retrieve.StoredInstance(*row) for row in rows]
    if not items:
        raise Http404("No such study, series or instance.")
    if wanted not in (None, "*", ExplicitVRLittleEndian):
        # a specific syntax: only instances stored in it, or uncompressed ones turned into it, go
        if UID(wanted).is_compressed and any(i.transfer_syntax_uid != wanted for i in items):
            return JsonResponse({"error": f"the instances are not all available in {wanted}"}, status=406)
    _audit(request, "retrieve", study, {"series": series or "", "instance": sop or "", "instances": len(items)})
    boundary = multipart.new_boundary()
    body = multipart.stream(_dicom_parts(items, wanted if wanted != ExplicitVRLittleEndian else None), boundary)
    return StreamingHttpResponse(body, content_type=multipart.content_type("application/dicom", boundary))


@dicomweb_view
def study(request: HttpRequest, study: str) -> HttpResponse:
    if request.method == "POST":
        from archive.dicomweb.stow import store

        return store(request, study)
    return _retrieve(request, study, None, None)


@dicomweb_view
def series(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _retrieve(request, study, series, None)


@dicomweb_view
def instance(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _retrieve(request, study, series, instance)


# ------------------------------------------------------------------------- metadata


def _metadata(request: HttpRequest, study: str, series: str | None, sop: str | None) -> HttpResponse:
    rows = list(
        _instances(request, "view", study, series, sop)
        .annotate(text=Cast("metadata", TextField()))
        .values_list("series__series_instance_uid", "sop_instance_uid", "text")
    )
    if not rows:
        raise Http404("No such study, series or instance.")
    base = _study_url(request, study)
    pieces = []
    for series_uid, sop_uid, text in rows:
        instance_url = f"{base}/series/{series_uid}/instances/{sop_uid}/"
        # BulkDataURIs are stored relative to the instance ("bulkdata/7FE00010"): make them absolute
        text = text.replace('"BulkDataURI": "bulkdata/', f'"BulkDataURI": "{instance_url}bulkdata/')
        text = text.replace('"BulkDataURI":"bulkdata/', f'"BulkDataURI":"{instance_url}bulkdata/')
        pieces.append(text)
    _audit(request, "study-view", study, {"metadata": series or "study", "instances": len(rows)})
    return HttpResponse("[" + ",".join(pieces) + "]", content_type="application/dicom+json")


@dicomweb_view
@gzip_page
def study_metadata(request: HttpRequest, study: str) -> HttpResponse:
    return _metadata(request, study, None, None)


@dicomweb_view
@gzip_page
def series_metadata(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _metadata(request, study, series, None)


@dicomweb_view
@gzip_page
def instance_metadata(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _metadata(request, study, series, instance)


# ------------------------------------------------------------------------- frames and bulk data


def _one_instance(request: HttpRequest, study: str, series: str, sop: str) -> Instance:
    """One instance by its UID (a unique index), checked against the path's series and study."""
    row = (
        access.instances_for(request.user, "images")
        .filter(sop_instance_uid=sop, series__series_instance_uid=series, series__study__study_instance_uid=study)
        .order_by()
        .first()
    )
    if row is None:
        raise Http404("No such instance.")
    return row


@dicomweb_view
def frames(request: HttpRequest, study: str, series: str, instance: str, frames: str) -> HttpResponse:
    """Frames (1-based, comma-separated) as multipart: native pixel bytes, or the stored
    compressed bitstream when the Accept header names its media type."""
    try:
        numbers = [int(n) for n in frames.split(",") if n.strip()]
    except ValueError:
        return JsonResponse({"error": "frame numbers are whole numbers separated by commas"}, status=400)
    row = _one_instance(request, study, series, instance)
    count = row.number_of_frames or 1
    if not numbers or any(n < 1 or n > count for n in numbers):
        return JsonResponse({"error": f"the instance has frames 1 to {count}"}, status=404)
    ds = pydicom.dcmread(storage.absolute(row.file_path))
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    accepted = [(media, params) for media, params in multipart.accept_ranges(request.headers.get("Accept", ""))]
    compressed_type = FRAME_TYPES.get(str(syntax))
    send_compressed = bool(compressed_type) and any(
        params.get("type", media) in (compressed_type, "*/*") and params.get("transfer-syntax", "") in ("", "*", str(syntax))
        and (params.get("type") or media) != "application/octet-stream"
        for media, params in accepted
    )
    parts = []
    if send_compressed:
        encapsulated = list(generate_frames(ds.PixelData, number_of_frames=count))
        for n in numbers:
            parts.append(({"Content-Type": f"{compressed_type}; transfer-syntax={syntax}"}, [encapsulated[n - 1]]))
        part_type = compressed_type
    else:
        for n in numbers:
            parts.append(({"Content-Type": "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"}, [_native_frame(ds, n, count)]))
        part_type = "application/octet-stream"
    boundary = multipart.new_boundary()
    return HttpResponse(b"".join(multipart.stream(parts, boundary)), content_type=multipart.content_type(part_type, boundary))


def _native_frame(ds: pydicom.Dataset, number: int, count: int) -> bytes:
    if not UID(ds.file_meta.TransferSyntaxUID).is_compressed and ds.get("BitsAllocated", 16) % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        data = ds.PixelData[(number - 1) * size : number * size]
        if not UID(ds.file_meta.TransferSyntaxUID).is_little_endian and ds.BitsAllocated > 8:
            data = np.frombuffer(data, dtype=f">u{ds.BitsAllocated // 8}").astype(f"<u{ds.BitsAllocated // 8}").tobytes()
        return data
    pixels = pydicom.pixels.pixel_array(ds, index=number - 1 if count > 1 else None, raw=True)
    return np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()


@dicomweb_view
def bulkdata(request: HttpRequest, study: str, series: str, instance: str, tag: str) -> HttpResponse:
    """The value of one (top-level) element that the metadata gave as a BulkDataURI."""
    row = _one_instance(request, study, series, instance)
    try:
        number = int(tag, 16)
    except ValueError:
        raise Http404("No such element.") from None
    ds = pydicom.dcmread(storage.absolute(row.file_path))
    if number not in ds:
        raise Http404("No such element.")
    value = ds[number].value
    data = value if isinstance(value, bytes) else str(value).encode()
    boundary = multipart.new_boundary()
    body = b"".join(multipart.stream([({"Content-Type": "application/octet-stream"}, [data])], boundary))
    return HttpResponse(body, content_type=multipart.content_type("application/octet-stream", boundary))


# ------------------------------------------------------------------------- rendered and thumbnails


def _image_format(request: HttpRequest, default: str = "image/jpeg") -> str:
    for media, _params in multipart.accept_ranges(request.headers.get("Accept", "")):
        if media in ("image/png", "image/jpeg"):
            return media
        if media in ("image/*", "*/*"):
            return default
    return default if not request.headers.get("Accept") else "image/jpeg"


def _rendered(request: HttpRequest, row: Instance, frame: int, kind: str) -> HttpResponse:
    media = _image_format(request)
    window = request.GET.get("window", "")
    try:
        if window:
            pieces = window.split(",")
            center, width = float(pieces[0]), float(pieces[1])
            if len(pieces) > 2 and pieces[2].strip().lower() not in ("linear", "linear_exact", "sigmoid", ""):
                raise ValueError(pieces[2])
            ds = pydicom.dcmread(storage.absolute(row.file_path))
            picture = Image.fromarray(render.windowed_pixels(ds, frame, (center, width)))
        else:
            if media == "image/jpeg" and kind == "preview":
                made = render.rendition(row, frame, "jpeg")
                return FileResponse(open(made.path, "rb"), content_type="image/jpeg")
            made = render.rendition(row, frame, kind)
            if media == "image/png":
                return FileResponse(open(made.path, "rb"), content_type="image/png")
            picture = Image.open(made.path)
    except (ValueError, TypeError):
        return JsonResponse({"error": "window is center,width[,function]"}, status=400)
    except render.RenderError as exc:
        return JsonResponse({"error": str(exc)}, status=422)
    out = io.BytesIO()
    if media == "image/png":
        picture.save(out, format="PNG", compress_level=1)
    else:
        picture.convert("RGB" if picture.mode not in ("L", "RGB") else picture.mode).save(out, format="JPEG", quality=90)
    return HttpResponse(out.getvalue(), content_type=media)


@dicomweb_view
def instance_rendered(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _rendered(request, _one_instance(request, study, series, instance), 1, "preview")


@dicomweb_view
def frame_rendered(request: HttpRequest, study: str, series: str, instance: str, frame: int) -> HttpResponse:
    row = _one_instance(request, study, series, instance)
    if not 1 <= frame <= (row.number_of_frames or 1):
        raise Http404("No such frame.")
    return _rendered(request, row, frame, "preview")


@dicomweb_view
def instance_thumbnail(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _rendered(request, _one_instance(request, study, series, instance), 1, "thumbnail")


def _series_picture(request: HttpRequest, study: str, series: str) -> HttpResponse:
    found = access.series_for(request.user, "images").filter(
        study__study_instance_uid=study, series_instance_uid=series
    ).values_list("pk", flat=True).first()
    representative = render.series_representative(found) if found else None
    if representative is None:
        raise Http404("No such series.")
    return _rendered(request, representative, 1, "thumbnail")


@dicomweb_view
def series_thumbnail(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _series_picture(request, study, series)


@dicomweb_view
def series_rendered(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _series_picture(request, study, series)


# ------------------------------------------------------------------------- WADO-URI


@dicomweb_view
def wado_uri(request: HttpRequest) -> HttpResponse:
    """WADO-URI (PS3.18 9): ``?requestType=WADO&studyUID=&seriesUID=&objectUID=[&contentType=]``."""
    params = request.GET
    if params.get("requestType") != "WADO":
        return JsonResponse({"error": "requestType must be WADO"}, status=400)
    study, series, sop = params.get("studyUID", ""), params.get("seriesUID", ""), params.get("objectUID", "")
    if not (study and series and sop):
        return JsonResponse({"error": "studyUID, seriesUID and objectUID are required"}, status=400)
    row = _one_instance(request, study, series, sop)
    content_type = params.get("contentType", "image/jpeg")
    if content_type == "application/dicom":
        _audit(request, "retrieve", study, {"wado-uri": sop})
        wanted = params.get("transferSyntax")
        item = retrieve.StoredInstance(row.pk, row.sop_instance_uid, row.sop_class_uid, row.transfer_syntax_uid, row.file_path)
        if not wanted or wanted == row.transfer_syntax_uid:
            return FileResponse(open(storage.absolute(row.file_path), "rb"), content_type="application/dicom")
        headers, chunks = next(_dicom_parts([item], None))
        return HttpResponse(b"".join(chunks), content_type="application/dicom")
    if content_type not in ("image/jpeg", "image/png"):
        return JsonResponse({"error": f"contentType {content_type[:40]} is not offered"}, status=406)
    frame = int(params.get("frameNumber", "1") or 1)
    if params.get("windowCenter") and params.get("windowWidth"):
        request.GET = request.GET.copy()
        request.GET["window"] = f"{params['windowCenter']},{params['windowWidth']}"
    request.META["HTTP_ACCEPT"] = content_type
    return _rendered(request, row, frame, "preview")
