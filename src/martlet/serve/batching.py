"""Dynamic batching: requests that arrive together are generated together.

Each non-streamed request becomes a Job (its prompt rows, the adapter and generation settings it asks
for). One worker thread takes the oldest waiting job and every other waiting job with the same key
(adapter + settings), up to `max_rows` rows, and generates them in one call. While it generates, new
jobs pile up and form the next batch, so throughput grows with the number of concurrent clients.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Hashable, Optional, Sequence

logger = logging.getLogger("martlet")


@dataclasses.dataclass
class Job:
    key: Hashable  # jobs with equal keys may share a batch
    rows: list  # prompts (token ids), one per wanted reply
    config: Any  # GenConfig
    adapter: Optional[str]
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class Batcher:
    """Collects Jobs and runs `generate(rows, config, adapter) -> outputs` on batches of them."""

    def __init__(self, generate: Callable[[Sequence[list], Any, Optional[str]], list], *, max_rows: int,
                 window_s: float = 0.005):
        self.generate = generate
        self.max_rows = max_rows
        self.window_s = window_s  # how long the first job of an idle server waits for company
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.closed = False
        self.batches = 0  # how many generate calls ran (for tests and logs)
        self.thread = threading.Thread(target=self._work, name="martlet-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            self.pending.append(job)
            self.cond.notify()
        return job.future

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the jobs already submitted, then stop the worker."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout)

    def _take(self) -> list[Job]:
        """The next batch: the oldest job and the waiting jobs that share its key, up to max_rows rows."""
        first = self.pending[0]
        batch, rows = [], 0
        for job in list(self.pending):
            if job.key == first.key and (not batch or rows + len(job.rows) <= self.max_rows):
                batch.append(job)
                rows += len(job.rows)
                self.pending.remove(job)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop the abandoned

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.closed)
                if not self.pending:
                    return
                if len(self.pending) == 1 and not self.closed:
                    self._gather()
                batch = self._take()
            if batch:
                self._run(batch)

    def _gather(self) -> None:
        """An idle server got one job: wait `window_s` for simultaneous requests to join it."""
        deadline = time.monotonic() + self.window_s
        while not self.closed and sum(len(j.rows) for j in self.pending) < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cond.wait(left)

    def _run(self, batch: list[Job]) -> None:
        rows = [row for job in batch for row in job.rows]
        start = time.perf_counter()
        try:
            outputs = self.generate(rows, batch[0].config, batch[0].adapter)
        except BaseException as exc:  # every job of the batch gets the failure
            for job in batch:
                job.future.set_exception(exc)
            return
        self.batches += 1
        logger.debug("batch of %d requests (%d rows) in %.2f s", len(batch), len(rows), time.perf_counter() - start)
        at = 0
        for job in batch:
            job.future.set_result(outputs[at: at + len(job.rows)])
            at += len(job.rows)
