"""Types of the compiled pgoutput decoder: native per-row message classes; the rarer messages
and the helpers are those of pgoutput_ref."""

from typing import Any

from rtcore.pgoutput_ref import (
    ARRAY_ELEMENTS as ARRAY_ELEMENTS,
)
from rtcore.pgoutput_ref import (
    MAX_JSON_DEPTH as MAX_JSON_DEPTH,
)
from rtcore.pgoutput_ref import (
    PG_EPOCH_OFFSET_US as PG_EPOCH_OFFSET_US,
)
from rtcore.pgoutput_ref import (
    SCALAR_CONVERTERS as SCALAR_CONVERTERS,
)
from rtcore.pgoutput_ref import (
    UNCHANGED as UNCHANGED,
)
from rtcore.pgoutput_ref import (
    DecodeError as DecodeError,
)
from rtcore.pgoutput_ref import (
    LogicalMessage as LogicalMessage,
)
from rtcore.pgoutput_ref import (
    Origin as Origin,
)
from rtcore.pgoutput_ref import (
    Relation as Relation,
)
from rtcore.pgoutput_ref import (
    StreamAbort as StreamAbort,
)
from rtcore.pgoutput_ref import (
    StreamCommit as StreamCommit,
)
from rtcore.pgoutput_ref import (
    StreamStart as StreamStart,
)
from rtcore.pgoutput_ref import (
    StreamStop as StreamStop,
)
from rtcore.pgoutput_ref import (
    Truncate as Truncate,
)
from rtcore.pgoutput_ref import (
    TypeInfo as TypeInfo,
)
from rtcore.pgoutput_ref import (
    convert_value as convert_value,
)
from rtcore.pgoutput_ref import (
    converter_for as converter_for,
)
from rtcore.pgoutput_ref import (
    format_lsn as format_lsn,
)
from rtcore.pgoutput_ref import (
    parse_array as parse_array,
)
from rtcore.pgoutput_ref import (
    parse_lsn as parse_lsn,
)
from rtcore.pgoutput_ref import (
    standby_status as standby_status,
)

class _Msg:
    kind: str
    def astuple(self) -> tuple: ...

class XLogData(_Msg):
    wal_start: int
    wal_end: int
    send_time: int
    message: Any
    def __init__(self, wal_start: int, wal_end: int, send_time: int, message: Any) -> None: ...

class Keepalive(_Msg):
    wal_end: int
    send_time: int
    reply_requested: bool
    def __init__(self, wal_end: int, send_time: int, reply_requested: bool) -> None: ...

class Begin(_Msg):
    final_lsn: int
    commit_time: int
    xid: int
    def __init__(self, final_lsn: int, commit_time: int, xid: int) -> None: ...

class Commit(_Msg):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int
    def __init__(self, flags: int, commit_lsn: int, end_lsn: int, commit_time: int) -> None: ...

class Insert(_Msg):
    relation: Relation
    new: dict[str, Any]
    xid: int | None
    def __init__(self, relation: Relation, new: dict[str, Any], xid: int | None = None) -> None: ...

class Update(_Msg):
    relation: Relation
    old_kind: str
    old: dict[str, Any] | None
    new: dict[str, Any]
    xid: int | None
    def __init__(self, relation: Relation, old_kind: str, old: dict[str, Any] | None, new: dict[str, Any],
                 xid: int | None = None) -> None: ...

class Delete(_Msg):
    relation: Relation
    old_kind: str
    old: dict[str, Any]
    xid: int | None
    def __init__(self, relation: Relation, old_kind: str, old: dict[str, Any], xid: int | None = None) -> None: ...

class Decoder:
    relations: dict[int, Relation]
    types: dict[int, TypeInfo]
    arrays: dict[int, int]
    domains: dict[int, int]
    errors: list[tuple[str, str, str, str]]
    in_stream: bool
    def __init__(self) -> None: ...
    def register_array(self, array_oid: int, element_oid: int) -> None: ...
    def register_domain(self, domain_oid: int, base_oid: int) -> None: ...
    def decode_copy(self, data: bytes) -> XLogData | Keepalive: ...
    def decode(self, buf: bytes | memoryview) -> Any: ...
