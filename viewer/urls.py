"""The portal's URLs (ARCHITECTURE.md, "URLs")."""

from django.urls import path, register_converter

from viewer import views


class UidConverter:
    """A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters."""

    regex = r"[0-9.]{1,64}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(UidConverter, "uid")

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
