"""The portal's pages: study list, study page, viewer, and the rendered images they show.

Views are thin: they read through the access service (``archive.access``), so a study out of
the user's scope is a 404, and hand the work to the query and render services. Every view
requires a signed-in user (``LoginRequiredMiddleware``).
"""

from __future__ import annotations

import datetime as dt

from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_GET

import audit
from archive import access
from archive import render as renderer
from archive.models import Instance, Series, Study
from archive.query import QueryError
from archive.slices import series_slices
from viewer.selectors import MODALITIES, StudySearch, ordered_series, search_studies
from viewer.templatetags.dicom import person_name

PAGE_SIZE = 50
# Rendered images never change under their URL (it carries the file's hash); they are
# patient data, so only the user's own browser keeps them.
IMMUTABLE = "private, max-age=31536000, immutable"


@require_GET
def study_list(request: HttpRequest) -> HttpResponse:
    """``/``: search the studies in scope, sorted and paged on the server."""
    _require(request, "images")
    search = StudySearch.from_params(request.GET, timezone.localdate())
    studies = Study.objects.none()
    try:
        studies = search_studies(search, access.studies_for(request.user))
    except QueryError as exc:
        search.errors["name"] = str(exc)
    paginator = Paginator(studies, PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    audit.record(
        "query",
        channel="web",
        request=request,
        patient_id=search.patient_id if search.patient_id and "*" not in search.patient_id else "",
        details={"search": search.identifier(), "text": search.text, "page": page.number, "matches": paginator.count},
    )
    params = request.GET.copy()
    params.pop("page", None)
    sort_params = params.copy()
    sort_params.pop("sort", None)
    context = {
        "search": search,
        "page": page,
        "studies": page.object_list,
        "modalities": MODALITIES,
        "quick_ranges": [("today", "Today"), ("yesterday", "Yesterday"), ("7d", "Last 7 days"), ("30d", "Last 30 days")],
        "query_string": params.urlencode(),
        "columns": _columns(search.sort, sort_params.urlencode()),
        "date_from": request.GET.get("date_from", "") if not request.GET.get("range") else _iso(search.date_from),
        "date_to": request.GET.get("date_to", "") if not request.GET.get("range") else _iso(search.date_to),
    }
    return render(request, "viewer/study_list.html", context, status=400 if search.errors else 200)


COLUMNS = [
    ("name", "Patient"),
    ("id", "Patient ID"),
    ("birth", "Birth date"),
    ("date", "Study date"),
    ("modalities", "Modalities"),
    ("description", "Description"),
    ("accession", "Accession"),
    ("series", "Series"),
    ("images", "Images"),
]


def _columns(sort: str, query_string: str) -> list[dict[str, str]]:
    """The list's column headers, each a link that sorts by it (again: the other way)."""
    columns = []
    for key, label in COLUMNS:
        state = "asc" if sort == key else "desc" if sort == "-" + key else ""
        target = "-" + key if state == "asc" or (not state and key in ("date", "series", "images")) else key
        prefix = query_string + "&" if query_string else ""
        columns.append({"key": key, "label": label, "state": state, "href": f"?{prefix}sort={target}"})
    return columns


def _iso(value: dt.date | None) -> str:
    return value.isoformat() if value else ""


@require_GET
def study_detail(request: HttpRequest, study_uid: str) -> HttpResponse:
    """``/studies/<uid>/``: the patient, the study, its series and the patient's other studies."""
    _require(request, "images")
    study = get_object_or_404(access.studies_for(request.user).select_related("patient"), study_instance_uid=study_uid)
    priors = access.studies_for(request.user).filter(patient=study.patient).exclude(pk=study.pk).order_by("-study_date")
    _audit_study(request, study, {"page": "study"})
    return render(
        request,
        "viewer/study_detail.html",
        {"study": study, "patient": study.patient, "series_list": ordered_series(study), "priors": priors},
    )


@require_GET
def viewer(request: HttpRequest, study_uid: str) -> HttpResponse:
    """``/viewer/<uid>/?series=<uid>``: the viewer, with the chosen series' slices inlined."""
    _require(request, "images")
    study = get_object_or_404(
        access.studies_for(request.user, "images").select_related("patient"), study_instance_uid=study_uid
    )
    series_list = ordered_series(study)
    if not series_list:
        raise Http404("The study holds no series.")
    chosen = next((s for s in series_list if s.series_instance_uid == request.GET.get("series")), series_list[0])
    _audit_study(request, study, {"page": "viewer", "series": chosen.series_instance_uid})
    context = {
        "study": study,
        "patient": study.patient,
        "series_list": series_list,
        "chosen": chosen,
        "overlay": {
            "patient_name": person_name(study.patient.patient_name),
            "patient_id": study.patient.patient_id,
            "birth_date": _iso(study.patient.patient_birth_date),
            "sex": study.patient.patient_sex,
            "study_date": _iso(study.study_date),
            "study_description": study.study_description,
        },
        "viewer_data": {
            "study": study.study_instance_uid,
            "series": [_series_entry(s) for s in series_list],
            "chosen": chosen.series_instance_uid,
            "slices": series_slices(chosen),
        },
    }
    return render(request, "viewer/viewer.html", context)


def _series_entry(series: Series) -> dict:
    return {
        "uid": series.series_instance_uid,
        "number": series.series_number,
        "description": series.series_description,
        "modality": series.modality,
        "images": series.number_of_series_related_instances,
    }


@require_GET
def series_slices_json(request: HttpRequest, study_uid: str, series_uid: str) -> JsonResponse:
    """The slices of a series, in order, with what the viewer needs to show each."""
    _require(request, "images")
    series = get_object_or_404(
        access.series_for(request.user, "images"), study__study_instance_uid=study_uid, series_instance_uid=series_uid
    )
    return JsonResponse({"series": _series_entry(series), "slices": series_slices(series)})


@require_GET
def frame_image(request: HttpRequest, sop_uid: str, frame: int, kind: str) -> HttpResponse:
    """A rendition of one frame (``preview``, ``packed`` or ``thumbnail``) as PNG, from the cache."""
    _require(request, "images")
    instance = get_object_or_404(
        access.instances_for(request.user).only(*renderer.RENDER_FIELDS, "series_id"), sop_instance_uid=sop_uid
    )
    _audit_retrieve(request, instance.series_id)
    return _image_response(request, instance, frame, kind, IMMUTABLE)


@require_GET
def series_thumbnail(request: HttpRequest, series_uid: str) -> HttpResponse:
    """The thumbnail of a series: its middle instance's first frame."""
    _require(request, "images")
    series = get_object_or_404(access.series_for(request.user, "images").only("pk"), series_instance_uid=series_uid)
    _audit_retrieve(request, series.pk)
    instance = renderer.series_representative(series.pk)
    if instance is None:
        raise Http404("The series holds no instances.")
    # A series grows while it arrives: revalidate, but cheaply (the ETag names the instance).
    return _image_response(request, instance, 1, "thumbnail", "private, no-cache")


def _image_response(request: HttpRequest, instance: Instance, frame: int, kind: str, cache_control: str) -> HttpResponse:
    if kind not in renderer.PNG_KINDS or not 1 <= frame <= (instance.number_of_frames or 1):
        raise Http404("No such frame.")
    tag = renderer.etag(instance, frame, kind)
    if request.headers.get("If-None-Match") == tag:
        response: HttpResponse = HttpResponseNotModified()
    else:
        try:
            made = renderer.rendition(instance, frame, kind)
        except renderer.RenderError as exc:
            return JsonResponse({"error": str(exc)}, status=422)
        response = FileResponse(open(made.path, "rb"), content_type="image/png")
    response["ETag"] = tag
    response["Cache-Control"] = cache_control
    return response


# ------------------------------------------------------------------------- access and audit


def _require(request: HttpRequest, action: str) -> None:
    """Refuse (403) a user whose roles do not allow ``action`` at all (the RIS role, say)."""
    if not access.may(request.user, action):
        raise PermissionDenied("Your account has no access to the portal's studies and images.")


AUDITED = "audited_series"  # session key: series whose study's viewing this session has recorded


def _audit_study(request: HttpRequest, study: Study, details: dict) -> None:
    """One "study view" event per page opening; the images it then loads are not logged again."""
    audit.record(
        "study-view",
        channel="web",
        request=request,
        patient_id=study.patient.patient_id,
        study_instance_uid=study.study_instance_uid,
        details=details,
    )
    _remember(request, list(study.series.values_list("pk", flat=True)))


def _remember(request: HttpRequest, series_ids: list[int]) -> None:
    seen = request.session.get(AUDITED, [])
    new = [pk for pk in series_ids if pk not in seen]
    if new:
        request.session[AUDITED] = (seen + new)[-1000:]


def _audit_retrieve(request: HttpRequest, series_id: int) -> None:
    """Images fetched without opening their study's page first: one "retrieve" event per study."""
    if series_id in request.session.get(AUDITED, []):
        return
    study = Study.objects.filter(series__pk=series_id).values("pk", "study_instance_uid", "patient__patient_id").first()
    if study is None:
        return
    audit.record(
        "retrieve",
        channel="web",
        request=request,
        patient_id=study["patient__patient_id"],
        study_instance_uid=study["study_instance_uid"],
        details={"images": "fetched without the study page"},
    )
    _remember(request, list(Series.objects.filter(study_id=study["pk"]).values_list("pk", flat=True)))
