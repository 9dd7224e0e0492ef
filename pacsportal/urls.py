"""The URL map: see ARCHITECTURE.md, "URLs"."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    # The study list lands with the web portal; until then the archive is browsed in admin.
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
