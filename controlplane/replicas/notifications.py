"""LISTEN on the shared database, in a thread of its own with a connection of its own.

Each notification is handed to the event loop as (channel, payload). When the connection is
lost, `on_change` gets (RECONNECTED, "") once it is back: notifications sent meanwhile are
gone, so whoever listens re-reads everything then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from controlplane.store.pg_url import DatabaseUrl
from controlplane.store.postgres import CONNECTION_DEFAULTS

log = structlog.get_logger("replicas")

STATE = "xdscp_state"  # pointers or rollouts changed
COMMANDS = "xdscp_commands"  # a follower handed the leader a command
COMMAND_DONE = "xdscp_command_done"  # the leader recorded a command's outcome
CHANNELS = (STATE, COMMANDS, COMMAND_DONE)
RECONNECTED = "reconnected"
RECONNECT_SECONDS = 1.0
POLL_SECONDS = 0.5  # how soon a stop is noticed

Handler = Callable[[str, str], None]


class Notifications:
    def __init__(self, url: DatabaseUrl, loop: asyncio.AbstractEventLoop, on_change: Handler):
        self._url = url
        self._loop = loop
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xdscp-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        lost = False
        while not self._stop.is_set():
            try:
                with self._connect() as db:
                    for channel in CHANNELS:
                        db.execute(f"LISTEN {channel}")
                    if lost:
                        self._hand(RECONNECTED, "")
                        log.info("listening to the database again")
                    lost = False
                    while not self._stop.is_set():
                        for notify in db.notifies(timeout=POLL_SECONDS):
                            self._hand(notify.channel, notify.payload)
            except psycopg.Error as error:
                if not lost:
                    log.warning(
                        "lost the database's notifications", error=self._url.hide(str(error))
                    )
                lost = True
                self._stop.wait(RECONNECT_SECONDS)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._url.url,
            autocommit=True,
            application_name="xdscp serve (notifications)",
            **{k: v for k, v in CONNECTION_DEFAULTS.items() if k not in self._url.options},
        )

    def _hand(self, channel: str, payload: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_change, channel, payload)
        except RuntimeError:  # the loop closed: the server is stopping
            self._stop.set()
