"""Sessions: what survives a disconnect so that a client can resume without loss.

A session belongs to one subject in one workspace and remembers its subscriptions. When its
connection ends it is suspended for `resume_ttl`; an `auth` with `resume` (same subject and
workspace) within that time takes it back. Suspended sessions are bounded by count (the oldest
is dropped first) and by age. A drained shutdown writes them to the state directory
(`dump`) and the next start reads them back (`restore`), so a restart within `resume_ttl`
still resumes.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from rtserver import channels
from rtserver.atomic_file import replace_file
from rtserver.channels import SubscriptionSpec

log = logging.getLogger("rtserver.sessions")
_DUMP_VERSION = 1


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

    def dump(self) -> bytes:
        """The suspended sessions, each with its wall-clock expiry (monotonic time does not
        survive a restart), for `restore` in the next process."""
        self.sweep()
        now_mono, now_wall = time.monotonic(), time.time()
        out: list[dict[str, Any]] = []
        for s in self._suspended.values():
            assert s.suspended_at is not None
            out.append({
                "id": s.id,
                "subject": s.subject,
                "workspace": s.workspace,
                "lastSeq": s.last_seq,
                "expiresAt": now_wall + s.suspended_at + self.ttl - now_mono,
                "subscriptions": [{"channel": spec.channel, "filter": spec.filter} for spec in s.specs.values()],
            })
        return msgspec.json.encode({"version": _DUMP_VERSION, "sessions": out})

    def restore(self, data: bytes) -> int:
        """Take back the sessions of `dump` that have not expired; returns how many."""
        try:
            doc = msgspec.json.decode(data)
            if not isinstance(doc, dict) or doc.get("version") != _DUMP_VERSION:
                raise ValueError(f"unknown format {doc.get('version') if isinstance(doc, dict) else doc!r}")
            rows = sorted(doc["sessions"], key=lambda r: r["expiresAt"])
            now_mono, now_wall = time.monotonic(), time.time()
            restored = 0
            for r in rows:
                left = float(r["expiresAt"]) - now_wall
                if left <= 0:
                    continue
                specs = {}
                for sub in r["subscriptions"]:
                    spec = channels.parse(sub["channel"], sub["filter"])
                    specs[spec.channel] = spec
                session = Session(id=r["id"], subject=r["subject"], workspace=r["workspace"], specs=specs,
                                  last_seq=int(r["lastSeq"]))
                self.suspend(session, session.last_seq)
                session.suspended_at = now_mono - (self.ttl - min(left, self.ttl))
                restored += 1
            return restored
        except (msgspec.DecodeError, ValueError, KeyError, TypeError, channels.ChannelError,
                channels.InvalidFilter) as exc:
            log.warning("suspended sessions not restored: unreadable dump", extra={"fields": {"error": str(exc)}})
            return 0


def write_dump(path: str, data: bytes) -> None:
    """Write `Sessions.dump()` to `path` (0600: session ids; blocking, run it in an executor)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    replace_file(path, data)


def take_dump(path: str) -> bytes | None:
    """Read and remove the dump at `path` (once restored, a later crash must not bring its
    sessions back a second time); None when there is none. Blocking: run it in an executor."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    os.unlink(path)
    return data
