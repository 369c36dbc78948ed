"""The consent registry: every version of every grant, in SQLite (WAL, ``synchronous=FULL``).

Why append-only: a consent is evidence. When a clinician saw a reading, the question later is
"what did the patient allow *at that moment*", and the answer must survive the grant being
narrowed, extended or revoked since. So every change (a grant, a revocation, an import that
changes a grant) is a new row ``(grant_id, version + 1)``; no row is ever updated or deleted
(triggers refuse it), the latest version of a grant is its state, and :meth:`history` gives
the rest. Each commit is fsync'd before a call returns, so a revocation the CLI reported is a
revocation a restarted service sees.

The row id (``seq``) is also the change counter: :meth:`changes` is the newest seq, which a
live stream polls (one primary-key read) to notice a revocation from another process within
its deadline, and :meth:`changed_since` gives what changed.

At scale: the same append-only versions in a Postgres table (``UNIQUE (grant_id,
version)``, a ``BIGSERIAL`` seq, ``LISTEN/NOTIFY`` on insert instead of polling), or a
compacted Kafka topic keyed by grant id whose latest record is a grant's state (the versions
kept by a non-compacted twin or by the audit log), which every service instance consumes
into its :class:`~clinic.consent.ConsentIndex`. Either way nothing is updated in place.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from clinic.consent import (
    ConsentConflict,
    ConsentIndex,
    ConsentStatus,
    Decision,
    Grant,
    InvalidConsent,
    UnknownGrant,
    decide,
    iso_from_us,
    new_grant_id,
)
from vitalproof.durable import fsync_dir

__all__ = ["ConsentStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grant_versions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- the change counter
    grant_id    TEXT NOT NULL,
    version     INTEGER NOT NULL,
    patient_id  TEXT NOT NULL,
    grantee     TEXT NOT NULL,
    metrics     TEXT NOT NULL,     -- JSON list, sorted; ["*"] for all vitals
    purpose     TEXT NOT NULL,
    start_us    INTEGER NOT NULL,
    end_us      INTEGER,           -- exclusive; NULL: no expiry
    status      TEXT NOT NULL,
    recorded_us INTEGER NOT NULL,
    recorded_by TEXT NOT NULL,
    UNIQUE (grant_id, version)
);
CREATE INDEX IF NOT EXISTS grant_versions_by_pair ON grant_versions (patient_id, grantee);
CREATE TRIGGER IF NOT EXISTS grant_versions_no_update BEFORE UPDATE ON grant_versions
BEGIN SELECT RAISE(ABORT, 'grant versions are append-only: write a new version'); END;
CREATE TRIGGER IF NOT EXISTS grant_versions_no_delete BEFORE DELETE ON grant_versions
BEGIN SELECT RAISE(ABORT, 'grant versions are append-only: write a new version'); END;
"""

_COLUMNS = (
    "grant_id, version, patient_id, grantee, metrics, purpose, start_us, end_us, status,"
    " recorded_us, recorded_by"
)
#: The latest version of each grant (the UNIQUE index answers the subquery).
_LATEST = (
    f"SELECT seq, {_COLUMNS} FROM grant_versions v WHERE version ="
    " (SELECT MAX(version) FROM grant_versions WHERE grant_id = v.grant_id)"
)


def _row_grant(row: sqlite3.Row) -> Grant:
    return Grant(
        grant_id=row["grant_id"],
        version=int(row["version"]),
        patient_id=row["patient_id"],
        grantee=row["grantee"],
        metrics=frozenset(json.loads(row["metrics"])),
        purpose=row["purpose"],
        start_us=int(row["start_us"]),
        end_us=None if row["end_us"] is None else int(row["end_us"]),
        status=ConsentStatus(row["status"]),
        recorded_us=int(row["recorded_us"]),
        recorded_by=row["recorded_by"],
    )


def _same_terms(a: Grant, b: Grant) -> bool:
    """Equal but for the version and who recorded it when."""
    return (a.patient_id, a.grantee, a.metrics, a.purpose, a.start_us, a.end_us, a.status) == (
        b.patient_id,
        b.grantee,
        b.metrics,
        b.purpose,
        b.start_us,
        b.end_us,
        b.status,
    )


class ConsentStore:
    """The grants file at ``path`` (created with its folder if missing).

    ``clock``: wall-clock seconds, stamped on every change (injectable so tests can expire a
    grant). Safe to share between threads; several processes may open the same file.
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise
        if created:
            fsync_dir(self.path.parent)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConsentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; COMMIT is fsync'd (WAL + synchronous=FULL)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    def _latest(self, db: sqlite3.Connection, grant_id: str) -> Grant | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM grant_versions WHERE grant_id = ?"
            " ORDER BY version DESC LIMIT 1",
            (grant_id,),
        ).fetchone()
        return None if row is None else _row_grant(row)

    @staticmethod
    def _insert(db: sqlite3.Connection, g: Grant) -> None:
        db.execute(
            f"INSERT INTO grant_versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                g.grant_id,
                g.version,
                g.patient_id,
                g.grantee,
                json.dumps(sorted(g.metrics)),
                g.purpose,
                g.start_us,
                g.end_us,
                g.status.value,
                g.recorded_us,
                g.recorded_by,
            ),
        )

    # -- changes ------------------------------------------------------------------------

    def grant(
        self,
        *,
        patient_id: str,
        grantee: str,
        metrics: Iterable[str],
        purpose: str,
        start_us: int | None = None,
        end_us: int | None = None,
        actor: str,
    ) -> Grant:
        """A new grant (version 1), from now unless ``start_us``; ``end_us`` is its expiry.

        ``metrics``: metric names, or ``["*"]`` (:data:`~clinic.consent.ALL_VITALS`).
        A start in the past is allowed (it changes nothing: consent is checked at the time
        of each disclosure); an expiry that has already passed is refused.
        """
        now = self.now_us()
        start = now if start_us is None else start_us
        if end_us is not None and end_us <= now:
            raise InvalidConsent(f"{iso_from_us(end_us)} has already passed", field="end")
        g = Grant(
            grant_id=new_grant_id(),
            version=1,
            patient_id=patient_id,
            grantee=grantee,
            metrics=frozenset(metrics),
            purpose=purpose,
            start_us=start,
            end_us=end_us,
            status=ConsentStatus.ACTIVE,
            recorded_us=now,
            recorded_by=actor,
        )
        with self._transaction() as db:
            self._insert(db, g)
        return g

    def revoke(self, grant_id: str, *, actor: str) -> Grant:
        """A new version of the grant with status inactive; the old versions stay."""
        with self._transaction() as db:
            latest = self._latest(db, grant_id)
            if latest is None:
                raise UnknownGrant(f"no grant {grant_id!r}")
            if latest.status is ConsentStatus.INACTIVE:
                raise ConsentConflict(
                    f"grant {grant_id} was already revoked at "
                    f"{iso_from_us(latest.recorded_us)} by {latest.recorded_by}"
                )
            g = replace(
                latest,
                version=latest.version + 1,
                status=ConsentStatus.INACTIVE,
                recorded_us=self.now_us(),
                recorded_by=actor,
            )
            self._insert(db, g)
        return g

    def import_grant(self, grant: Grant, *, actor: str) -> tuple[Grant, bool]:
        """Take in a grant read from elsewhere (a FHIR Consent): ``(latest, changed)``.

        An unknown id becomes version 1 of a new grant; a known one gets a new version when
        its terms differ (``changed``), and is left alone when they do not (importing the
        same document twice is harmless). The patient of a grant cannot change, and a
        revoked grant is not reactivated: that needs a new grant. The version is stamped now
        by ``actor``; the document's own version and date are not kept.
        """
        with self._transaction() as db:
            latest = self._latest(db, grant.grant_id)
            if latest is not None:
                if _same_terms(latest, grant):
                    return latest, False
                if latest.patient_id != grant.patient_id:
                    raise ConsentConflict(
                        f"grant {grant.grant_id} is patient {latest.patient_id}'s, not "
                        f"{grant.patient_id}'s"
                    )
                if latest.status is ConsentStatus.INACTIVE:
                    raise ConsentConflict(
                        f"grant {grant.grant_id} was revoked at "
                        f"{iso_from_us(latest.recorded_us)}: a revoked grant is not "
                        "reactivated, record a new one"
                    )
            g = replace(
                grant,
                version=1 if latest is None else latest.version + 1,
                recorded_us=self.now_us(),
                recorded_by=actor,
            )
            self._insert(db, g)
        return g, True

    # -- reading ------------------------------------------------------------------------

    def get(self, grant_id: str) -> Grant | None:
        """The latest version of a grant, or None."""
        with self._lock:
            return self._latest(self._db, grant_id)

    def history(self, grant_id: str) -> list[Grant]:
        """Every version of a grant, oldest first ([] for an unknown id)."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM grant_versions WHERE grant_id = ? ORDER BY version",
            (grant_id,),
        )
        return [_row_grant(r) for r in rows]

    def grants(
        self,
        *,
        patient_id: str | None = None,
        grantee: str | None = None,
        active_at_us: int | None = None,
    ) -> list[Grant]:
        """Latest versions, oldest grant first; ``active_at_us``: only those in force then."""
        sql, args = _LATEST, list[Any]()
        if patient_id is not None:
            sql += " AND patient_id = ?"
            args.append(patient_id)
        if grantee is not None:
            sql += " AND grantee = ?"
            args.append(grantee)
        if active_at_us is not None:
            sql += " AND status = ? AND start_us <= ? AND (end_us IS NULL OR ? < end_us)"
            args += [ConsentStatus.ACTIVE.value, active_at_us, active_at_us]
        return [_row_grant(r) for r in self._query(sql + " ORDER BY seq", args)]

    def decide(self, *, grantee: str, patient_id: str, metric: str, at_us: int) -> Decision:
        """One disclosure checked against the stored grants (for a history request; a live
        stream uses :meth:`index`)."""
        return decide(
            self.grants(patient_id=patient_id, grantee=grantee),
            grantee=grantee,
            patient_id=patient_id,
            metric=metric,
            at_us=at_us,
        )

    def index(self) -> ConsentIndex:
        """Every grant's latest version, indexed for the per-reading check."""
        return ConsentIndex(self.grants())

    def changes(self) -> int:
        """A counter that moves on every change (0 for an empty store), in any process."""
        row = self._query("SELECT MAX(seq) AS n FROM grant_versions")[0]
        return 0 if row["n"] is None else int(row["n"])

    def changed_since(self, n: int) -> list[Grant]:
        """The latest version of every grant changed after :meth:`changes` returned ``n``."""
        rows = self._query(
            _LATEST + " AND grant_id IN (SELECT grant_id FROM grant_versions WHERE seq > ?)"
            " ORDER BY seq",
            (n,),
        )
        return [_row_grant(r) for r in rows]
