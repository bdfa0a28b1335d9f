"""Connection strings without their secrets, for logs, /readyz and metric labels.

A password can sit in a URL's user info (`postgresql://rt:pw@db/app`), in its query
(`?password=pw`, `?sslpassword=pw`, `?authMechanismProperties=...:token`), or in a libpq
keyword/value string (`host=db password=pw`). Every parameter whose name mentions a password,
secret, token, key, credential or signature is masked, whatever the form, and a URL's `sig`,
`code`, `pwd` and `auth` query parameters (a signed URL, a function key in front of a JWKS
endpoint, a password or credentials under a short name). A query parameter's name is read
percent-decoded, as libpq reads it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme first: otherwise a keyword/value string
# Up to the last '@' before the first '/': libpq and pymongo take a '#' or '?' in a password as
# written (`postgresql://rt:p#w@db/app`), so neither may end the user info here.
_USERINFO = re.compile(r"://[^/]*@")
_SECRET_NAME = r"(?:pass|secret|token|key|credential|signature|authmechanismproperties)"
# Query parameters that are credentials under a short name: a signed URL's `sig` (Azure SAS),
# a function key's `code` (Azure Functions), as a JWKS URL behind such a gateway carries, and
# the usual abbreviations of a password and of credentials (`pwd`, `auth`).
_QUERY_SHORT_NAMES = frozenset(("sig", "code", "pwd", "auth"))
_SECRET_IN_NAME = re.compile(_SECRET_NAME, re.I)
# A query parameter's name, matched once percent-decoded, as libpq reads it (`?p%61ssword=pw`
# is a password); its value runs to the next & ; or #.
_QUERY_NAME = re.compile(r"[?&;]([^=&;#]*)=")
_VALUE_END = re.compile(r"[&;#]")
# A value is quoted, or runs to the first space that no backslash escapes (libpq: `password=p\ w`).
_KEYWORD_SECRET = re.compile(
    rf"(\b[\w.-]*{_SECRET_NAME}[\w.-]*\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|\S)+)", re.I
)


def redact(url: str) -> str:
    """`url` (a URL or a libpq keyword/value string) with user info and secret parameters masked."""
    if _URL.match(url):  # not "://" anywhere: a keyword's value may hold one (application_name=https://...)
        return _masked_query(_USERINFO.sub("://***@", url))
    return _KEYWORD_SECRET.sub(r"\1***", url)


def _masked_query(url: str) -> str:
    """`url` with the values of its secret query parameters masked. A parameter found inside
    another's value is looked at too (`?next=/x?password=pw`), as long as it is not masked."""
    out, done = [], 0
    for m in _QUERY_NAME.finditer(url):
        if m.start() < done:  # inside a value masked already
            continue
        name = unquote(m.group(1))
        if _SECRET_IN_NAME.search(name) or name.lower() in _QUERY_SHORT_NAMES:
            end = _VALUE_END.search(url, m.end())
            out += (url[done:m.end()], "***")
            done = end.start() if end else len(url)
    out.append(url[done:])
    return "".join(out)
