"""Limit/offset pagination whose numbers stay in the range a database takes (a huge limit or offset is clamped)."""

from rest_framework.pagination import LimitOffsetPagination

MAX_OFFSET = 2**31 - 1  # past any list; larger values overflow SQLite's and PostgreSQL's integers


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    max_limit = 1000

    def get_offset(self, request):
        return min(super().get_offset(request), MAX_OFFSET)
