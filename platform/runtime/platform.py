"""The runtime's root object: settings, the engine cache and the control database.

One ``Platform`` per process (the application factory and the CLI build it);
everything that needs a database gets it from here, never from a module global.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.runtime import control
from metacrm.runtime.changes import CONTROL, Watches
from metacrm.runtime.crypto import FieldCipher
from metacrm.runtime.database import Engines
from metacrm.runtime.model import ModelCache
from metacrm.runtime.settings import Settings
from metacrm.runtime.store import TenantStore
from metacrm.runtime.tokens import TokenCache


class Platform:
    """Access to the control database and to every tenant's store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines = Engines(pool_size=settings.pool_size)
        self._control_engine = self.engines.keep(settings.database_url)
        #: Tells whether a database changed since a cached fact was read (decision 0010).
        self.changes = Watches()
        #: Compiled metadata of each tenant's published version.
        self.models = ModelCache(self.changes)
        #: What recently presented API tokens stand for.
        self.tokens = TokenCache()
        #: Encrypts ``encrypted_text`` fields at rest.
        self.cipher = FieldCipher(settings.secret_key)

    @property
    def control_engine(self) -> sa.Engine:
        """The control database's engine: made once, never evicted from the engine cache."""
        return self._control_engine

    def control_mark(self) -> Hashable | None:
        """The control database's change mark now (see ``metacrm.runtime.changes``)."""
        return self.changes.mark(self.control_engine, CONTROL)

    def init_control(self) -> None:
        """Create the control database's tables (and the instance folder) when missing."""
        if self.settings.embedded:
            self.settings.instance_dir.mkdir(parents=True, exist_ok=True)
        control.create_schema(self.control_engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a control-database session that commits when the block succeeds."""
        with Session(self.control_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def tenant(self, session: Session, slug: str) -> control.Tenant | None:
        """Return the tenant with this slug, or None."""
        return session.scalar(sa.select(control.Tenant).where(control.Tenant.slug == slug))

    def store(self, tenant: control.Tenant) -> TenantStore:
        """Return the store where a tenant's tables live."""
        return TenantStore(tenant.slug, self.engines.get(tenant.database_url), tenant.schema)

    def close(self) -> None:
        """Close every pooled connection and the change watches."""
        self.changes.close()
        self.engines.dispose()
