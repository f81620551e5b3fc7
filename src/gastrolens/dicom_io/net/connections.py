"""No peer holds a slot it has not negotiated for: connections watched from open to close.

pynetdicom counts every open connection against ``max_associations`` until its
thread ends. A peer that sends an HTTP request or random bytes gets an A-ABORT, but
pynetdicom's reader then blocks in ``recv`` waiting for the rest of a "PDU" that never
comes, so the connection and its slot stay taken for as long as the peer keeps it
open; four such peers lock the port. :class:`ConnectionWatch` closes every connection
that has not completed association negotiation within ``acse_timeout`` seconds, and
at once when pynetdicom has already aborted it; each such drop is reported once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.association import Association

from gastrolens.dicom_io.net import pynetdicom_private

log = logging.getLogger(__name__)

DropReport = Callable[[Association, str], None]
"""Called once per dropped connection with the association and the reason."""
EndReport = Callable[[Association], None]
"""Called once per connection when its thread has ended, whatever the reason."""


class Phase(enum.Enum):
    OPEN = "open"
    """Connected; no A-ASSOCIATE answer given yet."""
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    """A-ASSOCIATE-RJ sent (already audited by whoever rejected it)."""


@dataclass
class _Watched:
    assoc: Association
    opened_at: float
    phase: Phase = Phase.OPEN
    closing_reason: str | None = None
    awaiting_close_since: float | None = None


class ConnectionWatch:
    """Tracks connections from ``opened`` until their thread ends; closes stragglers."""

    def __init__(
        self,
        *,
        acse_timeout: float,
        on_drop: DropReport,
        on_end: EndReport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.acse_timeout = acse_timeout
        self.on_drop = on_drop
        self.on_end = on_end
        self.clock = clock
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- events from the receiver ------------------------------------------------------

    def opened(self, assoc: Association) -> None:
        with self._lock:
            self._watched[id(assoc)] = _Watched(assoc, self.clock())

    def accepted(self, assoc: Association) -> None:
        self._set_phase(assoc, Phase.ACCEPTED)

    def rejected(self, assoc: Association) -> None:
        self._set_phase(assoc, Phase.REJECTED)

    def _set_phase(self, assoc: Association, phase: Phase) -> None:
        with self._lock:
            watched = self._watched.get(id(assoc))
            if watched is not None:
                watched.phase = phase

    # -- the sweep ---------------------------------------------------------------------

    def start(self, interval: float = 0.2) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="gastrolens-connections", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.sweep()  # report what ended meanwhile

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except Exception:  # the watch must outlive any one bad connection
                log.exception("connection sweep failed")

    def sweep(self) -> None:
        """One pass: report connections that ended, close those overdue."""
        now = self.clock()
        ended: list[_Watched] = []
        with self._lock:
            for key, watched in list(self._watched.items()):
                assoc = watched.assoc
                if assoc.ident is not None and not assoc.is_alive():
                    del self._watched[key]
                    ended.append(watched)
                    continue
                reason = self._overdue(watched, now)
                if reason is not None and watched.closing_reason is None:
                    watched.closing_reason = reason
                    log.warning("closing connection from %s: %s", assoc.requestor.address, reason)
                    pynetdicom_private.force_close(assoc)
        for watched in ended:
            if self.on_end is not None:
                self.on_end(watched.assoc)
            if watched.phase is Phase.OPEN:
                reason = (
                    watched.closing_reason or "the peer closed the connection before association negotiation completed"
                )
                self.on_drop(watched.assoc, reason)

    def _overdue(self, watched: _Watched, now: float) -> str | None:
        assoc = watched.assoc
        if assoc.ident is None:  # not started yet
            return None
        awaiting = pynetdicom_private.awaiting_close(assoc)
        if awaiting and watched.awaiting_close_since is None:
            watched.awaiting_close_since = now
        if watched.phase is Phase.OPEN:
            if awaiting:
                return "not a DICOM association request: A-ABORT sent, connection closed"
            if now - watched.opened_at >= self.acse_timeout:
                return f"no association negotiated within dicom.acse_timeout_seconds ({self.acse_timeout:g} s)"
        elif watched.awaiting_close_since is not None and now - watched.awaiting_close_since >= self.acse_timeout:
            return f"peer did not close within {self.acse_timeout:g} s of an A-ABORT or A-ASSOCIATE-RJ"
        return None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._watched)
