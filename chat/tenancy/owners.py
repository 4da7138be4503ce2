"""Who a request belongs to: the user it acts as (an API key acts as its user) and the key it came with.

One scope for everything a caller owns: conversations, jobs and cached replies belong to the user,
so two keys share them only when the operator made both act as the same user. The owner label
(`user:<id>`) is all the engine learns: it admits waiting requests round-robin between labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.models import ApiKey


def owner_label(user) -> str:
    """The opaque label of `user` for the engine and the reply cache ("anonymous" without a saved user)."""
    pk = getattr(user, "pk", None)
    return f"user:{pk}" if pk is not None else "anonymous"


@dataclass(frozen=True)
class Tenant:
    """The caller of one request: its user and, for API requests, its key (None for a browser session)."""

    user: object
    api_key: ApiKey | None = None
    end_user: str = ""  # the request's `user`: an opaque end-user id of the client's, for the ledger and logs

    @property
    def owner(self) -> str:
        return owner_label(self.user)

    @property
    def quota_identity(self) -> str:
        """Whose quota a generation spends: the key's own, else the session user's (as the rate limit)."""
        return f"key:{self.api_key.pk}" if self.api_key is not None else owner_label(self.user)
