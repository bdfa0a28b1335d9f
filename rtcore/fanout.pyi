"""Types of the compiled fan-out loops (rtcore/fanout.pyx), same API as fanout_ref."""

from collections.abc import Callable

class Outbox:
    @property
    def pending(self) -> bytes | list[bytes] | None: ...
    closed: bool
    write: Callable[[bytes], object] | None
    big: int
    on_big: Callable[[int], object] | None
    def __init__(self) -> None: ...

class SubKey:
    out: Outbox
    def __init__(self, out: Outbox | None = None) -> None: ...

def queue_one(out: Outbox, frame: bytes) -> bool: ...
def push_all(subs: list, frame: bytes, dirty: list) -> int: ...
def flush_all(dirty: list) -> tuple[int, int]: ...
