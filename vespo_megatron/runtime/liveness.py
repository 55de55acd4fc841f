"""Liveness apart from progress: heartbeats through the job's store, and waits that fail only on silence.

Between the trainer and the rollout workers a wait can last as long as the other side's work: a worker
generating a long rollout, a trainer running a long step. Bounding such waits with a timeout kills healthy
jobs; not bounding them hangs a job whose peer died. So every rank of a disaggregated job runs a
:class:`Liveness`: a daemon thread adds 1 to the rank's counter in the job's TCPStore (the torchrun /
``MASTER_ADDR:MASTER_PORT`` store) every ``period`` seconds, and :meth:`Liveness.wait` polls a pending
point-to-point operation while it watches the peer's counter. A peer whose counter stands still for
``rl.worker_timeout_s`` (SIGKILL, SIGSTOP, a lost node, an interpreter stuck with the GIL held) is a
:class:`WorkerFailure` naming its rank; a busy peer is waited for without limit. A peer whose connection
drops fails the operation itself, which is reported at once.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist


class WorkerFailure(RuntimeError):
    """A peer across the trainer/worker divide died or stopped answering; the message names its rank."""


def _store_client(timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class Liveness:
    """This rank's heartbeat, and the watch over the peers it waits for."""

    KEY = "vespo/heartbeat/{rank}"

    def __init__(self, rank: int, timeout_s: float, period_s: float | None = None):
        self.rank, self.timeout_s = rank, timeout_s
        self.period_s = period_s if period_s is not None else max(min(1.0, timeout_s / 10), 0.01)
        # Two store clients: the heartbeat thread's own, and the waiting thread's.
        self._beat_store = _store_client(max(timeout_s, 30.0))
        self._watch_store = _store_client(max(timeout_s, 30.0))
        self._seen: dict[int, tuple[int, float]] = {}
        self._beat_store.add(self.KEY.format(rank=rank), 1)
        self._thread = threading.Thread(target=self._beat, name=f"vespo-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        key = self.KEY.format(rank=self.rank)
        while True:
            time.sleep(self.period_s)
            try:
                self._beat_store.add(key, 1)
            except Exception:  # the store's host is gone: the peers' own watches report that
                return

    def publish(self, name: str, value: int) -> None:
        """Make a progress counter (e.g. the newest header sent) readable by every rank."""
        self._watch_store.set(f"vespo/progress/{name}", str(int(value)))

    def progress(self, name: str, default: int) -> int:
        """The last value :meth:`publish` gave ``name`` on any rank, ``default`` before the first."""
        key = f"vespo/progress/{name}"
        return int(self._watch_store.get(key)) if self._watch_store.check([key]) else default

    def check(self, peer: int, what: str) -> None:
        """Raise :class:`WorkerFailure` if ``peer``'s heartbeat has not moved for ``timeout_s`` seconds."""
        now = time.monotonic()
        try:
            count = self._watch_store.add(self.KEY.format(rank=peer), 0)
        except Exception as exc:
            raise WorkerFailure(f"{what}: the job's store (rank 0's host) stopped answering ({exc}); rank 0 "
                                "or its node is gone") from exc
        last = self._seen.get(peer)
        if last is None or count != last[0]:
            self._seen[peer] = (count, now)
            return
        if now - last[1] > self.timeout_s:
            raise WorkerFailure(f"{what}: rank {peer} has sent no heartbeat for {now - last[1]:.0f}s "
                                f"(rl.worker_timeout_s={self.timeout_s:g}): it is dead, stopped or stuck")

    def wait(self, work, peer: int, what: str) -> None:
        """Wait for a posted ``isend``/``irecv`` ``work`` with ``peer`` for as long as ``peer`` is alive.

        Gloo's point-to-point work reports completion only through ``wait()``, so a helper thread blocks in
        it while this thread watches the peer's heartbeat.
        """
        done, failed = threading.Event(), []

        def block() -> None:
            try:
                work.wait()
            except BaseException as exc:  # a dropped connection: the peer is gone
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=block, name=f"vespo-wait-{peer}", daemon=True).start()
        while not done.wait(self.period_s):
            try:
                self.check(peer, what)
            except WorkerFailure:
                if done.wait(self.period_s):  # completed as the peer finished and left (the store with it)
                    break
                raise
        if failed:
            raise WorkerFailure(f"{what} failed: rank {peer} is gone ({failed[0]})") from failed[0]
