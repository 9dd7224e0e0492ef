"""Sessions that end after a period without requests (PACS_SESSION_IDLE_MINUTES)."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.contrib.auth.middleware import LoginRequiredMiddleware
from django.http import HttpRequest, HttpResponse

_TOUCHED = "_touched"
REFRESH_SECONDS = 60  # the session's expiry moves forward at most once a minute (one write)


class IdleTimeout:
    """Keep a signed-in session alive while it is used: its cookie and stored expiry move
    forward on activity (SESSION_COOKIE_AGE from the last request, to within a minute), so an
    idle session expires after PACS_SESSION_IDLE_MINUTES, without a database write per request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        session = getattr(request, "session", None)
        if session is not None and request.user.is_authenticated:
            now = int(time.time())
            if now - int(session.get(_TOUCHED, 0)) >= REFRESH_SECONDS:
                session[_TOUCHED] = now  # marks it modified: saved with a new expiry and cookie
        return self.get_response(request)


class PortalLoginRequired(LoginRequiredMiddleware):
    """Every web page requires a signed-in user (Django's LoginRequiredMiddleware), except the
    API and DICOMweb, which authenticate each request themselves (tokens, Basic) and answer
    401 rather than redirect to the sign-in page."""

    EXEMPT = ("/api/", "/dicom-web/", "/wado")

    def process_view(self, request: HttpRequest, view_func, view_args, view_kwargs):  # noqa: ANN001, ANN201
        if request.path_info.startswith(self.EXEMPT):
            return None
        return super().process_view(request, view_func, view_args, view_kwargs)
