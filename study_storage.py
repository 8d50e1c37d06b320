"""Where a tuning study lives, and how its workers ride out the faults of a shared database.

A study lives in a journal file (one machine) or a database (SQLite, or a server that workers on several machines
reach: PostgreSQL, MySQL). With a database, each worker's running trial has a heartbeat: the worker records it every
``heartbeat`` seconds, and a trial whose heartbeat has been silent for ``grace`` seconds (its worker was killed, its
machine died) is failed by whichever worker looks next, with the reason, so that another takes its place.

Every call a worker makes to a database server is retried with backoff while the server cannot be reached (a
restart, a failover, a dropped connection, a server not up yet when the worker starts), one line per retry, for at most
``patience`` seconds: the trial that was running goes on, keeps its result and reports it once the server is back.
Past the bound the worker stops (``DatabaseUnavailable``), and a database whose disk is full stops it at once
(``DatabaseFull``): one line, exit status 1. Its trial stays running in the study until a worker starts next on its
machine: one it had trained is then recorded from its folder, an unfinished one failed.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy import exc as sql_errors

FIRST_RETRY_SECONDS, LONGEST_RETRY_SECONDS = 1.0, 30.0
# What the drivers say when the database's disk is full: SQLite (SQLITE_FULL), PostgreSQL and MySQL (ENOSPC).
DISK_FULL = ("database or disk is full", "no space left on device")
# A server that answered and refused (a wrong user or password, no such database): the user's to fix, never waited out.
REFUSED = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "access denied",
    "unknown database",
)
# SQLite has no server to wait for: of its errors only a file another writer holds ("database is locked") is waited out.
SQLITE_BUSY = "is locked"
# The driver to name for a URL that names none, and where it comes from (to SQLAlchemy 2.1 postgresql:// is psycopg 3).
DRIVERS = {
    "postgresql": ("postgresql+psycopg2", "the driver requirements.txt installs"),
    "mysql": ("mysql+pymysql", "after pip install pymysql"),
}


@dataclass(frozen=True)
class StorageSettings:
    """The heartbeat of a running trial, how long its silence is tolerated, and how long a worker waits for its
    database.
    """

    heartbeat: float = 60.0
    grace: float = 180.0
    patience: float = 600.0


class DatabaseFault(BaseException):
    """The study's database failed the worker, which stops with one line and exit status 1.

    A BaseException, as engine.RunInterrupted is, so that Optuna's optimize (which catches Exception) does not try to
    store the trial's failure in the database that just failed: the trial stays running until the next start settles it.
    ``remedy`` says what must happen before that start; ``trial``, filled in on the way up, what became of the trial.
    """

    def __init__(self, problem: str, remedy: str):
        super().__init__(problem)
        self.remedy = remedy
        self.trial: str | None = None

    def line(self, command: str) -> str:
        return "; ".join([str(self), *([self.trial] if self.trial else []), f"{self.remedy}: {command}"])


class DatabaseUnavailable(DatabaseFault):
    """The study's database stayed unreachable longer than the worker's patience."""

    def __init__(self, url: str, said: str, patience: float):
        super().__init__(
            f"the study's database {url} stayed unreachable for {patience:.0f} s ({said})", "when it is back, run"
        )


class DatabaseFull(DatabaseFault):
    """The disk of the study's database is full: no wait mends that, so the worker stops at once."""

    def __init__(self, url: str, said: str):
        super().__init__(f"the disk of the study's database {url} is full ({said})", "free some space on it, then run")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_journal(storage: str) -> bool:
    return storage.startswith("journal:") or storage.endswith(".log")


def database_error(error: BaseException) -> sql_errors.DBAPIError | None:
    """SQLAlchemy's error behind a storage call's ``error`` (Optuna wraps it in StorageInternalError); else None."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
    return cause if isinstance(cause, sql_errors.DBAPIError) else None


def is_full(error: sql_errors.DBAPIError) -> bool:
    return any(words in str(error.orig).lower() for words in DISK_FULL)


def is_unreachable(error: sql_errors.DBAPIError) -> bool:
    """The server could not be reached or dropped the connection (refused, closed, dropped), or another writer holds a
    SQLite file: what a worker waits out."""
    said = str(error.orig).lower()
    if isinstance(error.orig, sqlite3.Error):
        return SQLITE_BUSY in said
    lost = error.connection_invalidated or isinstance(error, (sql_errors.OperationalError, sql_errors.InterfaceError))
    return lost and not any(words in said for words in REFUSED)


def patiently(storage: PatientRDBStorage, call: Callable[[], Any]) -> Any:
    """``call()``, retried with backoff while the study's database is unreachable, for ``storage.patience`` seconds; a
    full disk fails it at once. Once the storage has failed, every later call fails at once too: the worker stops."""
    wait, deadline = FIRST_RETRY_SECONDS, None
    while True:
        if storage.fault is not None:
            raise storage.fault
        try:
            return call()
        except Exception as error:  # the drivers' and Optuna's types: database_error() picks the database's own
            cause = database_error(error)
            if cause is None or not (is_full(cause) or is_unreachable(cause)):
                raise
            said, now = first_line(cause.orig), time.monotonic()
            deadline = deadline or now + storage.patience
            if is_full(cause):
                storage.fault = DatabaseFull(storage.shown_url, said)
            elif now + wait > deadline:
                storage.fault = DatabaseUnavailable(storage.shown_url, said, storage.patience)
            else:
                print(
                    f"the study's database is unreachable ({said}); retrying in {wait:.0f} s, for at most "
                    f"{deadline - now:.0f} s more (--db-patience)",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(wait)
                wait = min(2 * wait, LONGEST_RETRY_SECONDS)
                continue
            raise storage.fault from None


def patient(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` of a storage, called ``patiently``."""

    @wraps(method)
    def call(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return patiently(self, lambda: method(self, *args, **kwargs))

    return call


class PatientRDBStorage(RDBStorage):
    """Optuna's database storage whose every call, its opening too, rides out an unreachable server for ``patience``
    seconds (``patiently``); ``fault`` is how it failed, once it has.
    """

    def __init__(self, url: str, settings: StorageSettings):
        self.patience, self.shown_url, self.fault = settings.patience, hide_password(url), None
        # a server that is not up yet when the worker starts is waited for as one that goes down later
        patiently(self, lambda: self.connect(url, settings))

    def connect(self, url: str, settings: StorageSettings) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat arguments
            super().__init__(
                url,
                engine_kwargs={"pool_pre_ping": True},  # a pooled connection the restart cut is replaced, not used
                heartbeat_interval=round(settings.heartbeat),
                grace_period=round(settings.grace),
            )

    def record_heartbeat(self, trial_id: int) -> None:
        """Called in Optuna's heartbeat thread, where an exception would print a traceback and end the heartbeat: a
        fault is kept instead (``fault``), for the worker's own next call to raise."""
        with contextlib.suppress(DatabaseFault):
            patiently(self, lambda: super(PatientRDBStorage, self).record_heartbeat(trial_id))


# Every other method a study calls on its storage (BaseStorage's interface and the heartbeat's), made patient.
for name in [name for name, value in vars(BaseStorage).items() if callable(value) and not name.startswith("__")] + [
    "_get_stale_trial_ids"
]:
    setattr(PatientRDBStorage, name, patient(getattr(RDBStorage, name)))


def unusable_storage(url: str, error: BaseException) -> str:
    """One line on a storage that cannot be opened; for a URL whose default driver is not installed, the URL that names
    the driver to use."""
    scheme, _, rest = url.partition("://")
    if isinstance(error, ImportError) and scheme in DRIVERS:
        driver, source = DRIVERS[scheme]
        return (
            f"cannot open the study storage {hide_password(url)}: SQLAlchemy's driver for it is not installed "
            f"({first_line(error.__cause__ or error)}); write it as {hide_password(f'{driver}://{rest}')}, {source}"
        )
    return (
        f"cannot open the study storage {hide_password(url)}: {first_line(error)}; give a journal file (PATH.log), "
        "sqlite:///PATH.db, or a reachable postgresql+psycopg2:// or mysql+pymysql:// URL with its driver installed"
    )


def open_storage(storage: str, settings: StorageSettings = StorageSettings()) -> optuna.storages.BaseStorage:
    """A journal file (``journal:PATH`` or ``PATH.log``), or a database URL with a heartbeat for its running trials."""
    if is_journal(storage):
        path = storage.removeprefix("journal:")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    return PatientRDBStorage(storage, settings)
