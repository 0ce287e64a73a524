"""nccl-check's answer to a rank that never joins, dies or stalls: one line naming the rank(s) and the collective, exit 3.

Every rank first joins a c10d TCPStore (rank 0 hosts it at MASTER_ADDR:MASTER_PORT, or torchrun's agent does) and
waits up to ``--timeout`` for the others' ``joined/<rank>`` keys; the process group is then built over the same store.
Once joined, a thread per rank bumps ``beat/<rank>`` every ``BEAT_S`` and publishes ``progress/<rank>`` (the collective
the rank last entered). When a collective fails (gloo's "connection reset / closed by peer") or the watchdog fires, the
rank watches the beats for ``WINDOW_S``: the ranks whose beat stood still are the dead ones. The first rank to reach a
verdict stores it under ``failure``; the other ranks' threads see it and end with the same verdict instead of waiting
out their own timeout. When rank 0, which hosts the store, dies, the store is unreachable and that is the verdict.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from ..core.errors import first_line
from .nccl import Watchdog

PREFIX = "hf-medvis nccl-check: error: "
EXIT_STALLED = 3
BEAT_S = 0.25  # heartbeat period
WINDOW_S = 1.5  # a rank whose beat stands still this long is dead
LINGER_S = 3.0  # the store's host waits this long for the other survivors to read the verdict before it exits
# Test hook, not a user option: "<rank>:<phase>" makes that rank os._exit(9) as it enters the first collective whose
# description starts with <phase> ("init", "all_reduce", "all_gather", ..., "final"), the way a killed rank vanishes.
DIE_AT_ENV = "HF_MEDVIS_NCCL_CHECK_DIE_AT"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _cause(err: BaseException | None) -> str:
    """A few words on what a failed collective reported."""
    if err is None:
        return ""
    text = first_line(err)
    for needle, words in (
        ("reset by peer", "connection reset"),
        ("closed by peer", "connection closed"),
        ("connection closed", "connection closed"),
        ("got 0 bytes", "connection closed"),
        ("broken pipe", "broken pipe"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
    ):
        if needle in text.lower():
            return words
    return text if len(text) <= 120 else text[:117] + "..."


def is_communication_error(err: BaseException) -> bool:
    """Errors of the store or the backend (gloo raises plain RuntimeErrors naming the transport), not bugs."""
    words = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket", "broken pipe")
    return isinstance(err, dist.DistError) or any(w in str(err).lower() for w in words)


class RankMonitor:
    """The store-side view of the ranks for one nccl-check run; see the module docstring."""

    def __init__(self, rank: int, world_size: int, addr: str, port: int, timeout_s: float, agent_store: bool) -> None:
        self.rank, self.world_size, self.addr, self.port = rank, world_size, addr, port
        self.timeout_s = timeout_s
        self.agent_store = agent_store  # torchrun's agent hosts the store: it outlives rank 0
        self.prefix = f"hf_medvis/nccl-check/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store: dist.Store | None = None  # the main thread's client (and the process group's)
        self._server: dist.TCPStore | None = None
        self._beat_store: dist.Store | None = None  # the heartbeat thread's own connection
        self._progress = "rendezvous"
        self._published = ""
        self._failing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead: list[int] = []  # the verdict's dead ranks: the store's host does not wait for them to read it
        die_rank, _, self._die_at = os.environ.get(DIE_AT_ENV, "").partition(":")
        self._die_here = bool(self._die_at) and die_rank.strip() == str(rank)

    @property
    def hosts_store(self) -> bool:
        return self.rank == 0 and not self.agent_store

    def _store_name(self) -> str:
        owner = "torchrun's agent" if self.agent_store else "rank 0"
        return f"{owner} (which hosts the rendezvous store at {self.addr}:{self.port})"

    # --- joining ----------------------------------------------------------------------------------------------------

    def join(self) -> None:
        """Connects to the store and waits until every rank has joined; ends the process (exit 3) otherwise."""
        deadline = time.monotonic() + self.timeout_s
        try:
            self.store = self._connect(deadline)
            self.store.set(f"joined/{self.rank}", socket.gethostname())
            self.store.add("joined", 1)
            while self.store.add("joined", 0) < self.world_size:
                verdict = self._failure()
                if verdict is not None:
                    self._end(verdict, self.store)
                if time.monotonic() > deadline:
                    absent = [r for r in range(self.world_size) if not self.store.check([f"joined/{r}"])]
                    self._abort(
                        f"{_ranks(absent)} never joined ({self.world_size} expected, {self.world_size - len(absent)} "
                        f"joined within {self.timeout_s:g} s) during rendezvous",
                        dead=absent,
                    )
                time.sleep(0.1)
            self._beat_store = self._client(min(5.0, self.timeout_s))
        except dist.DistError as err:
            self._end(
                f"{self._store_name()} is unreachable during rendezvous ({_cause(err)}): it died or its host went down"
            )
        self._thread = threading.Thread(target=self._beat, name="nccl-check-heartbeat", daemon=True)
        self._thread.start()

    def _connect(self, deadline: float) -> dist.Store:
        if self.hosts_store:
            try:
                self._server = dist.TCPStore(
                    self.addr,
                    self.port,
                    self.world_size,
                    is_master=True,
                    timeout=timedelta(seconds=self.timeout_s * 2 + 10),
                    wait_for_workers=False,
                    multi_tenant=True,
                )
            except dist.DistNetworkError as err:
                raise ValueError(
                    f"rank 0 cannot host the rendezvous store on port {self.port}: {_cause(err)}"
                ) from None
            return dist.PrefixStore(self.prefix, self._server)
        # Probe the port first: TCPStore's own connect retries with back-off and overshoots the deadline by seconds.
        while True:
            try:
                socket.create_connection((self.addr, self.port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._end(
                        f"{self._store_name()} never came up within {self.timeout_s:g} s during rendezvous (rank 0 not "
                        "started or dead, or MASTER_ADDR/MASTER_PORT wrong)"
                    )
                time.sleep(0.2)
        return self._client(self.timeout_s * 2 + 10)  # the process group's store: as patient as the process group

    def _client(self, timeout_s: float) -> dist.Store:
        client = dist.TCPStore(
            self.addr, self.port, None, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        return dist.PrefixStore(self.prefix, client)

    # --- while running ----------------------------------------------------------------------------------------------

    def enter(self, what: str) -> None:
        """Called as this rank enters a collective (``what``: "all_reduce of 64 KiB", "init", ...)."""
        if self._die_here and what.startswith(self._die_at):
            os._exit(9)
        self._progress = what

    def _beat(self) -> None:
        store = self._beat_store
        while not self._stop.wait(BEAT_S):
            try:
                store.add(f"beat/{self.rank}", 1)
                if self._progress != self._published:
                    store.set(f"progress/{self.rank}", self._progress)
                    self._published = self._progress
                verdict = self._failure(store)
            except dist.DistError:
                continue  # the store's host is gone: a failing collective or the watchdog will say so
            if verdict is not None and self._failing.acquire(blocking=False):
                self._report_and_exit(verdict, store)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turns a failed collective (dead peer, unreachable store) into the one-line verdict and exit 3."""
        try:
            yield
        except RuntimeError as err:
            if not is_communication_error(err):
                raise
            self.fail(err)

    def on_watchdog(self, message: str) -> None:
        """The watchdog's ``on_timeout``: a collective made no progress within ``--timeout``."""
        self.fail(None, stalled=True)

    def fail(self, err: BaseException | None, stalled: bool = False) -> None:
        """Finds out which ranks are gone and ends the process with one line. Never returns."""
        self._failing.acquire()  # a second caller (main thread vs watchdog) waits here for the first one's exit
        what = self._progress
        store = self._beat_store or self.store
        detail = _cause(err) if err is not None else f"no progress for {self.timeout_s:g} s"
        try:
            store.set(f"failed/{self.rank}", "1")
            verdict = self._failure(store)
            if verdict is None:
                verdict = self._diagnose(store, what, detail, stalled)
                store.compare_set("failure", "", verdict)
                verdict = store.get("failure").decode()
        except dist.DistError as store_err:
            if self.hosts_store:
                verdict = f"{what} failed ({detail}) and the rendezvous store stopped answering ({_cause(store_err)})"
            else:
                verdict = f"{self._store_name()} is unreachable during {what} ({detail}): it died or its host went down"
        self._report_and_exit(verdict, store)

    def _diagnose(self, store: dist.Store, what: str, detail: str, stalled: bool) -> str:
        before = {r: store.add(f"beat/{r}", 0) for r in range(self.world_size)}
        time.sleep(WINDOW_S)
        after = {r: store.add(f"beat/{r}", 0) for r in range(self.world_size)}
        exited = {r for r in range(self.world_size) if store.check([f"failed/{r}"])}
        dead = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r] and r not in exited]
        if dead:
            self._dead = dead
            alive = [r for r in range(self.world_size) if r not in dead]
            return (
                f"{_ranks(dead)} died during {what} ({detail}; no heartbeat for {WINDOW_S:g} s); surviving ranks: "
                + ", ".join(map(str, alive))
            )
        if stalled:
            late = [
                f"rank {r} is alive but last entered {store.get(f'progress/{r}').decode()}"
                for r in range(self.world_size)
                if r != self.rank and store.check([f"progress/{r}"]) and store.get(f"progress/{r}").decode() != what
            ]
            return (
                f"{what} did not complete within {self.timeout_s:g} s on rank {self.rank}"
                + (f"; {'; '.join(late)}" if late else "; every rank is alive and entered it")
                + " (a rank is stuck or the network is down; check NCCL_DEBUG=INFO output)"
            )
        return f"{what} failed on rank {self.rank} ({detail}); every rank still has a heartbeat"

    # --- ending -----------------------------------------------------------------------------------------------------

    def _failure(self, store: dist.Store | None = None) -> str | None:
        store = store or self.store
        if store is None or not store.check(["failure"]):
            return None
        return store.get("failure").decode() or None

    def _abort(self, verdict: str, dead: list[int]) -> None:
        """A verdict reached by this rank during rendezvous (no heartbeat thread yet)."""
        self._failing.acquire()
        self._dead = dead
        with contextlib.suppress(dist.DistError):
            self.store.compare_set("failure", "", verdict)
            verdict = self.store.get("failure").decode()
        self._report_and_exit(verdict, self.store)

    def _end(self, verdict: str, store: dist.Store | None = None) -> None:
        self._failing.acquire()
        self._report_and_exit(verdict, store)

    def _report_and_exit(self, verdict: str, store: dist.Store | None) -> None:
        message = f"{PREFIX}rank {self.rank}: {verdict}"
        if store is not None:
            with contextlib.suppress(dist.DistError):
                store.set(f"failed/{self.rank}", "1")  # read, and not dead: the store's host need not wait for us
        if store is None or not self.hosts_store:
            Watchdog._exit(message)  # prints the line and os._exit(3): a wedged collective cannot be joined
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        self._linger(store)
        os._exit(EXIT_STALLED)

    def _linger(self, store: dist.Store) -> None:
        """Keeps the store up until the other survivors have read the verdict (they mark ``failed/<rank>``)."""
        others = [r for r in range(self.world_size) if r != self.rank and r not in self._dead]
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(dist.DistError):
            while others and time.monotonic() < deadline:
                others = [r for r in others if not store.check([f"failed/{r}"])]
                time.sleep(0.1)


class MonitoredWatchdog(Watchdog):
    """The run's watchdog: reports through the monitor, and tells it which collective this rank enters."""

    def __init__(self, monitor: RankMonitor, timeout_s: float) -> None:
        self.monitor = monitor
        super().__init__(timeout_s, monitor.rank, on_timeout=monitor.on_watchdog)

    def arm(self, what: str) -> None:
        self.monitor.enter(what)
        super().arm(what)
