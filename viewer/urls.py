"""The portal's URLs (ARCHITECTURE.md, "URLs")."""

from django.urls import path

import pacsportal.converters  # noqa: F401 - registers the "uid" converter

from viewer import views


app_name = "viewer"
urlpatterns = [
    path("", views.study_list, name="study-list"),
    path("studies/<uid:study_uid>/", views.study_detail, name="study-detail"),
    path("studies/<uid:study_uid>/series/<uid:series_uid>/slices.json", views.series_slices_json, name="series-slices"),
    path("viewer/<uid:study_uid>/", views.viewer, name="viewer"),
    path(
        "render/instances/<uid:sop_uid>/frames/<int:frame>/<str:kind>.png",
        views.frame_image,
        name="frame-image",
    ),
    path("render/series/<uid:series_uid>/thumbnail.png", views.series_thumbnail, name="series-thumbnail"),
]
