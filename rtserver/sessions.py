"""Sessions: what survives a disconnect so that a client can resume without loss.

A session belongs to one subject in one workspace and remembers its subscriptions. When its
connection ends it is suspended for `resume_ttl`; an `auth` with `resume` (same subject and
workspace) within that time takes it back. Suspended sessions are bounded by count (the oldest
is dropped first) and by age.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from rtserver.channels import SubscriptionSpec


@dataclass
class Session:
    id: str
    subject: str
    workspace: str
    specs: dict[str, SubscriptionSpec] = field(default_factory=dict)
    suspended_at: float | None = None
    # The workspace position when the connection ended: the replay start when a resume
    # carries no `since` (a client that passes its last seen seq gets an exact replay).
    last_seq: int = 0


class Sessions:
    def __init__(self, ttl: float, max_suspended: int):
        self.ttl = ttl
        self.max_suspended = max_suspended
        self._suspended: OrderedDict[str, Session] = OrderedDict()
        self.expired = 0

    def new(self, subject: str, workspace: str) -> Session:
        return Session(id=secrets.token_urlsafe(18), subject=subject, workspace=workspace)

    def suspend(self, session: Session, last_seq: int) -> None:
        session.suspended_at = time.monotonic()
        session.last_seq = last_seq
        self._suspended[session.id] = session
        self._suspended.move_to_end(session.id)
        while len(self._suspended) > self.max_suspended:
            self._suspended.popitem(last=False)
            self.expired += 1

    def take(self, session_id: str, subject: str, workspace: str) -> Session | None:
        """The suspended session `session_id` if it may be resumed by `subject` in `workspace`."""
        self.sweep()
        session = self._suspended.get(session_id)
        if session is None or session.subject != subject or session.workspace != workspace:
            return None
        del self._suspended[session_id]
        session.suspended_at = None
        return session

    def sweep(self) -> None:
        horizon = time.monotonic() - self.ttl
        while self._suspended:
            sid, oldest = next(iter(self._suspended.items()))
            if oldest.suspended_at is not None and oldest.suspended_at >= horizon:
                break
            del self._suspended[sid]
            self.expired += 1

    def __len__(self) -> int:
        return len(self._suspended)
