"""The URL map: see ARCHITECTURE.md, "URLs"."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("viewer.urls")),
]
