"""`--store postgresql://...`: telling a database URL from a SQLite path, checking it, and
showing it without its password.

The URL is a secret (it may carry the password), so anything printed or logged about the
database uses `redact` or `describe`, never the URL itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCHEMES = ("postgresql://", "postgres://")
MAX_URL_CHARS = 4096  # a connection URL longer than this is refused, not parsed
_USERINFO_PASSWORD = re.compile(r"^([a-z]+://[^:@/?#]*):[^@/?#]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_HIDDEN = "***"


class StoreUrlError(ValueError):
    pass


def is_database_url(text: str) -> bool:
    """True for a PostgreSQL URL; False for a path. Another scheme is refused: it is not
    a file name anyone meant."""
    lowered = text.lower()
    if lowered.startswith(SCHEMES):
        return True
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise StoreUrlError(
            f"--store {redact(text)}: only postgresql:// and postgres:// URLs or a SQLite "
            "file path are supported"
        )
    return False


def redact(url: str) -> str:
    """The URL with any password (user:PASSWORD@ or ?password=) replaced by ***."""
    return _QUERY_PASSWORD.sub(rf"\g<1>{_HIDDEN}", _USERINFO_PASSWORD.sub(rf"\1:{_HIDDEN}@", url))


@dataclass(frozen=True)
class DatabaseUrl:
    url: str = field(repr=False)  # secret: never print it
    host: str
    port: str
    dbname: str
    password: str | None = field(repr=False)
    options: frozenset[str] = frozenset()  # the libpq options the URL sets

    @classmethod
    def parse(cls, url: str) -> DatabaseUrl:
        """StoreUrlError naming --store (and the redacted URL) if libpq would not take it."""
        from psycopg import conninfo

        if len(url) > MAX_URL_CHARS:
            raise StoreUrlError(f"--store: a database URL is at most {MAX_URL_CHARS} characters")
        try:
            params = conninfo.conninfo_to_dict(url)
        except Exception as error:  # psycopg.ProgrammingError; libpq says what is wrong
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreUrlError(
                f"--store {redact(url)} is not a valid PostgreSQL URL: {_hide(reason, url)}"
            ) from None
        for port in str(params.get("port") or "5432").split(","):
            if not (port.isdigit() and 0 < int(port) < 65536):
                raise StoreUrlError(
                    f"--store {redact(url)} is not a valid PostgreSQL URL: port {port!r} is "
                    "not a number from 1 to 65535"
                )
        password = params.get("password")
        return cls(
            url=url,
            host=str(params.get("host") or "localhost"),
            port=str(params.get("port") or "5432"),
            dbname=str(params.get("dbname") or params.get("user") or "(user's database)"),
            password=str(password) if password else None,
            options=frozenset(params),
        )

    def describe(self) -> str:
        """host:port/dbname: what messages and logs name the database by."""
        return f"{self.host}:{self.port}/{self.dbname}"

    def hide(self, text: str) -> str:
        """`text` (e.g. a driver's error message) with the password removed if it holds it."""
        return _hide(text, self.url, self.password)


def _hide(text: str, url: str, password: str | None = None) -> str:
    text = text.replace(url, redact(url))
    if password:
        text = text.replace(password, _HIDDEN)
    return text
