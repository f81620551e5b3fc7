"""Alembic environment: runs migrations on the engine GastroLens hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from gastrolens.db.tables import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # the plain `alembic` command line, used to autogenerate revisions
        engine = create_engine(config.get_main_option("sqlalchemy.url"))  # type: ignore[arg-type]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
