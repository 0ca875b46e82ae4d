"""Who a request acts for: a member of one tenant, through a token or a login session.

Every way in (bearer token, login session, a rule run on a user's behalf)
ends in a ``Principal``; access checks read only this, so there is one
permission path whatever the credential.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from metacrm.runtime.control import ApiToken, Membership, User


@dataclass(frozen=True)
class Principal:
    """A tenant member and the credential the request came with."""

    user: User
    membership: Membership
    #: The bearer token the request presented, if it came with one.
    token: ApiToken | None = None
    #: The server-side login session the request's cookie names, if it came with one.
    session_id: uuid.UUID | None = None
    #: What requests derived from this principal (its access under a model), kept as
    #: long as the principal is: one request, or, for a token, while the token cache
    #: holds its rows (the control database unchanged; ``tokens._Entry``).
    memo: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.membership.tenant_id

    @property
    def read_only(self) -> bool:
        """Tell whether the credential only allows reading (a read-only token)."""
        return self.token is not None and self.token.read_only
