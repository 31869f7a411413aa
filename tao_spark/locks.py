"""The round lock: one row per holder in ``locks``, so two schedulers never run a round at the same time.

    holder = locks.acquire(tables, "round", lease_s=6 * 3600)
    try: ...
    finally: locks.release(tables, "round", holder)
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
from pyspark.sql import functions as F

from tao_spark.config import UserError
from tao_spark.tables import Tables, columns

log = logging.getLogger("tao.locks")


class Busy(UserError):
    """Another process holds the lock."""


def acquire(tables: Tables, name: str, lease_s: int) -> str:
    """Take the lock ``name`` or raise ``Busy``; returns this holder's id.

    Every contender inserts its own row, then the row that appeared in the earliest Delta version among the
    live ones wins. Commit order is the same for everyone who looks, so exactly one contender wins even if
    the engine rebased the two commits instead of failing one. A holder that died stops counting when its
    lease expires, or at once when it ran on this host and its process is gone (a SIGKILLed scheduler).
    """
    holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    live = F.col("expires_at") > F.lit(now)
    tables.ensure("locks")
    others = tables.read("locks").where((F.col("name") == name) & live).collect()
    for row in [r for r in others if _dead(r.holder)]:
        log.warning(f"tao: lock {name!r}: holder {row.holder} is no longer running; releasing its lock")
        release(tables, name, row.holder)
        others.remove(row)
    if others:
        raise Busy(f"a round is in progress: lock {name!r} held by {others[0].holder} since "
                   f"{others[0].acquired_at:%Y-%m-%d %H:%M:%S} (lease until {others[0].expires_at:%H:%M:%S})")
    row = pd.DataFrame([{"name": name, "holder": holder, "acquired_at": now,
                         "expires_at": now + timedelta(seconds=lease_s)}], columns=columns("locks"))
    tables.merge("locks", tables.frame("locks", row))
    winner = _first_live_holder(tables, name, now)
    if winner != holder:
        release(tables, name, holder)
        raise Busy(f"a round is in progress: lock {name!r} taken by {winner}")
    return holder


def _dead(holder: str) -> bool:
    """True when ``holder`` ran on this host and its process has exited (checked by PID: a PID reused since
    then keeps the lock until its lease ends, the safe side)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _first_live_holder(tables: Tables, name: str, now: datetime) -> str | None:
    version = tables.snapshot("locks")
    first: str | None = None
    while version >= 0:
        rows = [r for r in tables.read("locks", version=version)
                .where((F.col("name") == name) & (F.col("expires_at") > F.lit(now))).collect() if not _dead(r.holder)]
        if not rows:
            break
        first = sorted(rows, key=lambda r: (r.acquired_at, r.holder))[0].holder if len(rows) > 1 else rows[0].holder
        version -= 1
    return first


def release(tables: Tables, name: str, holder: str) -> None:
    key = pd.DataFrame([{"name": name, "holder": holder}])
    tables.delete("locks", tables.spark.createDataFrame(key, "name string, holder string"))
