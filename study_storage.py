"""Where a tuning study lives, and how its workers ride out the faults of a shared database.

A study lives in a journal file (one machine) or a database (SQLite, or a server that workers on several machines
reach: PostgreSQL, MySQL). With a database, each worker's running trial has a heartbeat: the worker records it every
``heartbeat`` seconds, and a trial whose heartbeat has been silent for ``grace`` seconds (its worker was killed, its
machine died) is failed by whichever worker looks next, with the reason, so that another takes its place.

Every call a worker makes to a database server is retried with backoff while the server cannot be reached (a
restart, a failover, a dropped connection), one line per retry, for at most ``patience`` seconds: the trial that was
running goes on, keeps its result and reports it once the server is back. Past the bound the worker stops
(``DatabaseUnavailable``: one line, exit status 1), and its unfinished trial is failed when a worker starts next.
"""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class StorageSettings:
    """The heartbeat of a running trial, how long its silence is tolerated, and how long a worker waits for its
    database.
    """

    heartbeat: float = 60.0
    grace: float = 180.0
    patience: float = 600.0


class DatabaseUnavailable(Exception):
    """The study's database stayed unreachable longer than the worker's patience."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_journal(storage: str) -> bool:
    return storage.startswith("journal:") or storage.endswith(".log")


def unreachable(error: BaseException) -> BaseException | None:
    """The driver's error, when ``error`` says the database server could not be reached (refused, closed, dropped); else
    None. Optuna wraps SQLAlchemy's errors in StorageInternalError."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
    if isinstance(cause, (sql_errors.OperationalError, sql_errors.InterfaceError)) or (
        isinstance(cause, sql_errors.DBAPIError) and cause.connection_invalidated
    ):
        return cause
    return None


def patient(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` of a storage, retried with backoff while its database is unreachable, for
    ``self.patience`` seconds."""

    @wraps(method)
    def call(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        wait, deadline = FIRST_RETRY_SECONDS, None
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as error:  # the drivers' and Optuna's types: unreachable() picks the ones to wait out
                cause = unreachable(error)
                if cause is None:
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.patience
                if now + wait > deadline:
                    raise DatabaseUnavailable(
                        f"the study's database {hide_password(self.url)} stayed unreachable for {self.patience:.0f} s "
                        f"({first_line(cause.orig if isinstance(cause, sql_errors.DBAPIError) else cause)}); when it "
                        "is back, run the same command: this worker's unfinished trial is then failed and run again"
                    ) from None
                print(
                    f"the study's database is unreachable ({first_line(getattr(cause, 'orig', cause))}); retrying in "
                    f"{wait:.0f} s, for at most {deadline - now:.0f} s more (--db-patience)",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(wait)
                wait = min(2 * wait, LONGEST_RETRY_SECONDS)

    return call


class PatientRDBStorage(RDBStorage):
    """Optuna's database storage whose every call rides out an unreachable server for ``patience`` seconds
    (``patient``).
    """

    def __init__(self, url: str, settings: StorageSettings):
        self.patience = settings.patience
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat arguments
            super().__init__(
                url,
                engine_kwargs={"pool_pre_ping": True},  # a pooled connection the restart cut is replaced, not used
                heartbeat_interval=round(settings.heartbeat),
                grace_period=round(settings.grace),
            )


# Every method a study calls on its storage (BaseStorage's interface and the heartbeat's), made patient.
for name in [name for name, value in vars(BaseStorage).items() if callable(value) and not name.startswith("__")] + [
    "record_heartbeat",
    "_get_stale_trial_ids",
]:
    setattr(PatientRDBStorage, name, patient(getattr(RDBStorage, name)))


def open_storage(storage: str, settings: StorageSettings = StorageSettings()) -> optuna.storages.BaseStorage:
    """A journal file (``journal:PATH`` or ``PATH.log``), or a database URL with a heartbeat for its running trials."""
    if is_journal(storage):
        path = storage.removeprefix("journal:")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    return PatientRDBStorage(storage, settings)
