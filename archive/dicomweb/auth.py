"""Who is calling a DICOMweb (or API) endpoint: the session, HTTP Basic, or a token.

Basic credentials are checked through Django's ``authenticate`` (so django-axes counts and
locks out failures) and then remembered for a few minutes by a hash of them, so that a
viewer's hundreds of requests do not each pay for a password hash. Tokens are DRF's
(``manage.py drf_create_token USER``), sent as ``Authorization: Token <key>`` or
``Bearer <key>``. Unsafe requests authenticated by the session cookie must carry the CSRF
token; Basic and Token requests need none (no cookie is involved).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth import authenticate as django_authenticate
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from archive.query import QueryError

BASIC_CACHE_SECONDS = 300
_basic_cache: dict[str, tuple[float, int]] = {}
_basic_lock = threading.Lock()
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def authenticate(request: HttpRequest) -> tuple[Any, str]:
    """(user, how) for the request; (None, "") when nobody is signed in or the credentials fail."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return _basic(request, credentials.strip()), "basic"
    if scheme in ("token", "bearer"):
        return _token(credentials.strip()), "token"
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return user, "session"
    return None, ""


def _basic(request: HttpRequest, credentials: str) -> Any:
    key = hashlib.sha256(credentials.encode()).hexdigest()
    now = time.monotonic()
    with _basic_lock:
        cached = _basic_cache.get(key)
    if cached and now - cached[0] < BASIC_CACHE_SECONDS:
        user = get_user_model().objects.filter(pk=cached[1], is_active=True).first()
        if user is not None:
            return user
    try:
        username, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user = django_authenticate(request, username=username, password=password)
    if user is not None and user.is_active:
        with _basic_lock:
            if len(_basic_cache) > 10_000:
                _basic_cache.clear()
            _basic_cache[key] = (now, user.pk)
        return user
    return None


def _token(key: str) -> Any:
    from rest_framework.authentication import TokenAuthentication
    from rest_framework.exceptions import AuthenticationFailed

    try:
        user, _token = TokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return None
    return user


def unauthorized(message: str = "Authentication required: HTTP Basic, a token, or a signed-in session.") -> HttpResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = 'Basic realm="pacsportal", charset="UTF-8"'
    return response


def dicomweb_view(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Authenticate (401 without a user), check CSRF for cookie-authenticated writes, and
    answer a query the engine cannot use with 400 and the reason."""

    @login_not_required
    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "OPTIONS":
            return HttpResponse(status=204)
        user, how = authenticate(request)
        if user is None:
            return unauthorized()
        if how == "session" and request.method not in SAFE_METHODS:
            refused = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, view, args, kwargs)
            if refused is not None:
                return JsonResponse({"error": "CSRF token missing or incorrect"}, status=403)
        request.user = user
        try:
            return view(request, *args, **kwargs)
        except QueryError as exc:
            return JsonResponse({"error": str(exc)}, status=400)

    return wrapper
