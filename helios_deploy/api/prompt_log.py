"""The prompt changes of streams, recorded in the job store every API replica shares, so the replica holding a
stream learns each change a node accepted for it, also one whose note on the stream's own channel died with the
node (the node sends the note on the holder's stream, then answers the steering replica: a kill -9 in between
loses the note while the steering replica has its answer).

    log = PromptLog(store)                      # the API's job store (SQLite or PostgreSQL): table prompt_changes
    log.record(stream_id, from_chunk, prompt)   # by whichever replica got the node's answer to a set_prompt
    log.changes(stream_id)                      # [(from_chunk, prompt), ...] in the order recorded, or None
    log.ended(stream_id)                        # the stream ended: its rows go (in the background)
    missing(noted, recorded)                    # the recorded changes the holder has no note of

Every call waits at most ``WAIT`` seconds: a store that is away (or slow) never fails a prompt change nor holds a
failover up; it is logged and the holder goes on with its own notes. Rows of streams whose end was never
recorded (their replica died) are deleted after ``KEEP_SECONDS`` by any replica's sweep.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Sequence

WAIT = 1.0  # seconds a record or a read waits for the store
KEEP_SECONDS = 3600.0  # rows older than this are swept (a stream lasts minutes; its snapshots hold older changes)
SWEEP_EVERY = 300.0

_log = logging.getLogger("helios_deploy.api")


class PromptLog:
    def __init__(self, store, wait: float = WAIT, keep: float = KEEP_SECONDS):
        self.store, self.wait, self.keep = store, wait, keep
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="helios-prompt-log")
        self._swept = 0.0
        self._lock = threading.Lock()

    def _call(self, what: str, fn, *args):
        """``fn(q, *args)`` in one store transaction, waited for at most ``wait`` s; None when it failed or is late."""
        def run():
            with self.store._tx() as q:
                return fn(q, *args)

        try:
            return self._pool.submit(run).result(self.wait)
        except concurrent.futures.TimeoutError:
            _log.warning("the job store did not %s within %g s: going on without it", what, self.wait)
        except Exception as e:  # noqa: BLE001 - StoreError, a closed log...: the change itself must not fail
            _log.warning("the job store could not %s: %s", what, e)
        return None

    def record(self, stream_id: str, from_chunk: int, prompt: str) -> bool:
        """Keep a change a node accepted; False (logged) when the store could not take it in time."""
        done = self._call("record a prompt change", _insert, stream_id, int(from_chunk), prompt, time.time())
        self._maybe_sweep()
        return done is not None

    def changes(self, stream_id: str) -> list[tuple[int, str]] | None:
        """The stream's recorded changes, in the order recorded; None when the store could not be read."""
        return self._call("read the prompt changes", _select, stream_id)

    def ended(self, stream_id: str | None) -> None:
        """Delete the stream's rows (not waited for)."""
        if stream_id:
            self._submit(_delete, stream_id)
        self._maybe_sweep()

    def _maybe_sweep(self) -> None:
        """Every ``SWEEP_EVERY`` s at most (at a record or a stream's end): delete the rows older than ``keep``."""
        now = time.time()
        with self._lock:
            if now - self._swept < SWEEP_EVERY:
                return
            self._swept = now
        self._submit(_sweep, now - self.keep)

    def _submit(self, fn, *args) -> None:
        try:
            self._pool.submit(self._quietly, fn, *args)
        except RuntimeError:  # closed
            pass

    def _quietly(self, fn, *args) -> None:
        try:
            with self.store._tx() as q:
                fn(q, *args)
        except Exception as e:  # noqa: BLE001 - StoreError mostly: the sweep deletes them later
            _log.warning("the job store could not delete prompt changes: %s", e)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _insert(q, stream_id: str, from_chunk: int, prompt: str, at: float) -> bool:
    q("INSERT INTO prompt_changes (stream_id, from_chunk, prompt, recorded_at) VALUES (?, ?, ?, ?)",
      (stream_id, from_chunk, prompt, at))
    return True


def _select(q, stream_id: str) -> list[tuple[int, str]]:
    rows = q("SELECT from_chunk, prompt FROM prompt_changes WHERE stream_id=? ORDER BY recorded_at", (stream_id,))
    return [(int(at), str(prompt)) for at, prompt in rows]


def _delete(q, stream_id: str) -> None:
    q("DELETE FROM prompt_changes WHERE stream_id=?", (stream_id,))


def _sweep(q, before: float) -> None:
    q("DELETE FROM prompt_changes WHERE recorded_at < ?", (before,))


def missing(noted: Sequence[tuple[int, str]], recorded: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """The ``recorded`` changes that are not among the ``noted`` ones (a change noted n times accounts for n of
    its records), ordered by the chunk they apply from, ties in recorded order. Those are the changes whose notes
    died with the stream's node: made on it last (a node sends its notes in order, so one lost means the later ones
    are lost too), after every noted change, and on one node a later change never applies from an earlier chunk,
    so that order is the order the node applied them in."""
    left = collections.Counter(noted)
    out = []
    for change in recorded:
        if left[change] > 0:
            left[change] -= 1
        else:
            out.append(change)
    return sorted(out, key=lambda change: change[0])

