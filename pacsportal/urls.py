"""The URL map: see ARCHITECTURE.md, "URLs"."""

from django.contrib import admin
from django.urls import include, path

from archive.dicomweb.wado import wado_uri

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", include("archive.api.urls")),
    path("dicom-web/", include("archive.dicomweb.urls")),
    path("wado", wado_uri, name="wado-uri"),  # WADO-URI at its customary place too
    path("", include("viewer.urls")),
]
