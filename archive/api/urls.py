"""/api/: the REST API (DRF), its OpenAPI schema and browsable docs."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from archive.api import views

router = DefaultRouter()
router.register("patients", views.PatientViewSet, basename="patient")
router.register("studies", views.StudyViewSet, basename="study")
router.register("series", views.SeriesViewSet, basename="series")
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("labels", views.AccessLabelViewSet, basename="label")
router.register("nodes", views.RemoteNodeViewSet, basename="node")
router.register("sends", views.SendJobViewSet, basename="send")

app_name = "api"
urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("", include(router.urls)),
]
