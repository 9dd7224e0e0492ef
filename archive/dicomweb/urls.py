"""DICOMweb paths under /dicom-web/ (PS3.18 Table 10.4.1-1, 10.5.1-1, 10.6.1-2)."""

from django.urls import path

import pacsportal.converters  # noqa: F401 - registers the "uid", "frames" and "tag" converters
from archive.dicomweb import qido, wado

app_name = "dicomweb"
S = "studies/<uid:study>"
SE = S + "/series/<uid:series>"
I = SE + "/instances/<uid:instance>"
urlpatterns = [
    path("studies", qido.studies, name="studies"),  # QIDO-RS search; STOW-RS POST
    path("series", qido.all_series, name="series"),
    path("instances", qido.all_instances, name="instances"),
    path(S, wado.study, name="study"),  # WADO-RS; STOW-RS POST
    path(S + "/metadata", wado.study_metadata, name="study-metadata"),
    path(S + "/series", qido.study_series, name="study-series"),
    path(S + "/instances", qido.study_instances, name="study-instances"),
    path(SE, wado.series, name="series-retrieve"),
    path(SE + "/metadata", wado.series_metadata, name="series-metadata"),
    path(SE + "/rendered", wado.series_rendered, name="series-rendered"),
    path(SE + "/thumbnail", wado.series_thumbnail, name="series-thumbnail"),
    path(SE + "/instances", qido.series_instances, name="series-instances"),
    path(I, wado.instance, name="instance"),
    path(I + "/metadata", wado.instance_metadata, name="instance-metadata"),
    path(I + "/rendered", wado.instance_rendered, name="instance-rendered"),
    path(I + "/thumbnail", wado.instance_thumbnail, name="instance-thumbnail"),
    path(I + "/frames/<frames:frames>", wado.frames, name="frames"),
    path(I + "/frames/<int:frame>/rendered", wado.frame_rendered, name="frame-rendered"),
    path(I + "/bulkdata/<tag:tag>", wado.bulkdata, name="bulkdata"),
    path("wado", wado.wado_uri, name="wado-uri"),
]
