"""Paging of every API list: ``?limit=`` (at most 1,000) and ``?offset=``."""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination

MAX_OFFSET = 1_000_000_000  # beyond any archive; keeps the database's integer types happy


class Pagination(LimitOffsetPagination):
    default_limit = 100
    max_limit = 1000

    def get_offset(self, request) -> int:  # noqa: ANN001
        return min(super().get_offset(request), MAX_OFFSET)
