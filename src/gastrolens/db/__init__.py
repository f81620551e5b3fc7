"""Tables, sessions and migrations, the work queue, the audit writer and read-side queries."""

from gastrolens.db.engine import Database

__all__ = ["Database"]
