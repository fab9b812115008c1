"""Multi-GPU worker groups: one process per GPU; rank 0 consumes the queue and shares each job.

The protocol, over a gloo control group beside the group that carries the tensors (NCCL on GPUs):

- Every rank loads the same pipeline and warms it up; warm-up runs are deterministic, so the ranks'
  collectives match without messages.
- Rank 0 runs the Celery worker. For each job it broadcasts a ``GroupMessage`` (parameters, seed,
  decoded reference images); while idle it broadcasts a keep-alive every quarter of the group
  timeout, so a follower whose rank 0 is gone times out instead of waiting forever.
- All ranks call the pipeline with the same inputs (same seeds: the same latents). At every step
  they agree on whether to go on: rank 0 contributes its job store's answer (canceled, no longer
  this attempt's, or an error), the followers 0, and the largest code wins; so a cancel stops all
  ranks at the same step, before the next collective.
- After each job every rank reports its outcome, so a failure on one rank fails the job on rank 0.
- Supervision: the process started as the worker is rank 0 and starts ranks 1..N-1. When one of
  them dies, rank 0 hands its running job back to the queue (attempt + 1, the lost-worker rule)
  and exits; a follower exits when rank 0's process is gone. Collectives time out after
  ``--group-timeout-s``, so no rank waits forever on a dead peer.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from PIL import Image

from shared.schemas import GenerationParams
from worker.runner import JobInterrupted
from worker.types import GenerationOutput, StepCallback

log = logging.getLogger("fluxgate.group")

CONTINUE, STOP, FAIL = 0, 1, 2


class GroupError(RuntimeError):
    """The group cannot go on together (a rank failed, or a peer stopped answering)."""


class GroupStop(Exception):
    """Raised on a follower's step when rank 0 stopped the job (cancel, lost ownership, error)."""


@dataclass
class GroupMessage:
    kind: str  # "job", "idle" or "stop"
    params: GenerationParams | None = None
    references: list[Image.Image] = field(default_factory=list)


class ControlChannel:
    """Rank 0's messages to the group and the group's agreements, on a gloo process group."""

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank

    def send(self, message: GroupMessage) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group, device=torch.device("cpu"))

    def receive(self) -> GroupMessage:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group, device=torch.device("cpu"))
        message: GroupMessage = box[0]
        return message

    def agree(self, code: int, final: bool) -> tuple[int, bool]:
        """The largest of every rank's code (0 go on, 1 stop, 2 failed), and whether any rank is done."""
        value = torch.tensor([code, int(final)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return int(value[0]), bool(value[1])


class Lockstep:
    """One job's agreements: one per step, then one final, on every rank.

    A rank whose pipeline fails mid-job makes its final agreement early; the others see ``final`` in
    their step agreement, stop there and make no further one, so the counts always match.
    """

    def __init__(self, channel: ControlChannel) -> None:
        self.channel = channel
        self.over = False

    def step(self, code: int) -> int:
        agreed, final = self.channel.agree(code, final=False)
        if final:
            self.over = True
            return FAIL
        return agreed

    def finish(self, outcome: int) -> int:
        if self.over:
            return FAIL
        self.over = True
        return self.channel.agree(outcome, final=True)[0]


class GroupEngine:
    """Rank 0's engine: shares each job with the followers and runs it in lockstep with them."""

    def __init__(
        self,
        engine: Any,
        channel: ControlChannel,
        keepalive_s: float,
        supervisor: GroupLauncher | None = None,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.keepalive_s = keepalive_s
        self.supervisor = supervisor
        self._lock = threading.Lock()  # one message at a time: a job, or a keep-alive between jobs
        self._stopped = threading.Event()
        self._keepalive = threading.Thread(
            target=self._keep_alive, name="fluxgate-group-keepalive", daemon=True
        )

    def __getattr__(self, name: str) -> Any:  # device, pipeline_class, offloaded, layout ...
        return getattr(self.engine, name)

    def start(self) -> None:
        self._keepalive.start()

    def stop(self) -> None:
        """Tell the followers to exit (a clean shutdown of the group)."""
        self._stopped.set()
        with self._lock:
            self.channel.send(GroupMessage("stop"))

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput:
        with self._lock:
            self.channel.send(GroupMessage("job", params, list(references)))
            lockstep = Lockstep(self.channel)
            stop: list[BaseException] = []

            def step(index: int, total: int) -> None:
                code = CONTINUE
                try:
                    on_step(index, total)
                except JobInterrupted as interrupted:  # canceled, or no longer this attempt's
                    stop.append(interrupted)
                    code = STOP
                except Exception as error:  # the job store failing: the job fails on every rank
                    stop.append(error)
                    code = FAIL
                if lockstep.step(code) != CONTINUE:
                    raise stop[0] if stop else GroupError("the job failed on another rank of the group")

            try:
                output = self.engine.generate(params, step, references=references)
            except BaseException:
                self._unless_group_broken(lambda: lockstep.finish(FAIL))
                raise
            if self._unless_group_broken(lambda: lockstep.finish(CONTINUE)) != CONTINUE:
                raise GroupError("the job failed on another rank of the group")
            return output

    def _unless_group_broken(self, collective: Callable[[], int]) -> int:
        """Run a control collective; when it fails because a peer died (often before the supervisor's
        watch notices), the running job goes back to the queue instead of failing: see ``abandon``."""
        try:
            return collective()
        except Exception:
            if self.supervisor is not None and not self.supervisor.healthy():
                self.supervisor.abandon()
            raise

    def _send_idle(self) -> int:
        self.channel.send(GroupMessage("idle"))
        return CONTINUE

    def _keep_alive(self) -> None:
        while not self._stopped.wait(self.keepalive_s):
            with self._lock:
                if not self._stopped.is_set():
                    self._unless_group_broken(self._send_idle)


def run_follower(engine: Any, channel: ControlChannel) -> None:
    """A follower's life: run every job rank 0 shares, in lockstep, until told to stop."""
    while True:
        message = channel.receive()
        if message.kind == "stop":
            return
        if message.kind != "job" or message.params is None:
            continue

        lockstep = Lockstep(channel)

        def step(index: int, total: int, lockstep: Lockstep = lockstep) -> None:
            if lockstep.step(CONTINUE) != CONTINUE:
                raise GroupStop

        outcome = CONTINUE
        try:
            engine.generate(message.params, step, references=message.references)
        except GroupStop:
            pass
        except Exception:  # rank 0 fails the job; this rank stays up for the next one
            log.exception("rank %d: the job failed", channel.rank)
            outcome = FAIL
        lockstep.finish(outcome)


@dataclass(frozen=True)
class GroupSpec:
    """Where the group meets and how long a collective may wait."""

    world_size: int
    address: str
    device_type: str  # "cuda" (NCCL for tensors) or "cpu" (gloo for everything)
    timeout_s: float
    json_logs: bool = False

    @property
    def keepalive_s(self) -> float:
        return self.timeout_s / 4


def init_rank(spec: GroupSpec, rank: int, store: Any = None) -> ControlChannel:
    """Join the group: this rank's GPU, the tensor group, and the gloo control group. Rank 0 passes
    the rendezvous store it serves; the others connect to it."""
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "cpu:gloo,cuda:nccl" if spec.device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=spec.timeout_s)
    if store is None:
        host, port = spec.address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), spec.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=spec.world_size, timeout=timeout)
    return ControlChannel(dist.new_group(backend="gloo", timeout=timeout), rank)


Loader = Callable[[Any, Any, Mapping[str, str]], Any]


def follower_main(
    spec: GroupSpec, rank: int, parent: int, model: Any, options: Any, loader: Loader | None
) -> None:
    """Entry point of ranks 1..N-1 (a spawned process): load, warm up, then follow rank 0."""
    from shared.logging import configure_logging
    from worker.startup import load_engine

    configure_logging(json=spec.json_logs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_exit_with_parent, args=(parent,), name="fluxgate-parent-watch", daemon=True
    ).start()
    channel = init_rank(spec, rank)
    engine = (loader or load_engine)(model, options, os.environ)
    log.info("rank %d of %d ready", rank, spec.world_size)
    try:
        run_follower(engine, channel)
    except Exception:
        log.exception("rank %d: leaving the group", rank)
        os._exit(1)
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    log.error("rank 0 (pid %d) is gone; this rank exits", parent)
    os._exit(1)


class GroupLauncher:
    """Rank 0's side of starting and supervising the group."""

    def __init__(self, spec: GroupSpec, store: Any) -> None:
        self.spec = spec
        self.store = store
        self.followers: list[multiprocessing.process.BaseProcess] = []
        self._closing = threading.Event()
        self._on_rank_lost: Callable[[], None] = lambda: None
        self._abandoning = threading.Lock()

    @staticmethod
    def local(world_size: int, device_type: str, timeout_s: float, json_logs: bool = False) -> GroupLauncher:
        # Rank 0 serves the rendezvous on a port the system picks (no race for a "free" port).
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False
        )
        spec = GroupSpec(world_size, f"127.0.0.1:{store.port}", device_type, timeout_s, json_logs)
        return GroupLauncher(spec, store)

    def start(self, model: Any, options: Any, loader: Loader | None) -> ControlChannel:
        """Spawn ranks 1..N-1 (fresh interpreters: CUDA never forks), then join as rank 0."""
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.spec.world_size):
            process = context.Process(
                target=follower_main,
                args=(self.spec, rank, os.getpid(), model, options, loader),
                name=f"fluxgate-rank-{rank}",
                daemon=True,
            )
            process.start()
            self.followers.append(process)
        return init_rank(self.spec, 0, self.store)

    def supervise(self, on_rank_lost: Callable[[], None]) -> None:
        """Watch the followers from a thread: when one dies, ``on_rank_lost`` runs and the group exits."""
        self._on_rank_lost = on_rank_lost
        threading.Thread(target=self._watch, name="fluxgate-group-watch", daemon=True).start()

    def healthy(self, grace_s: float = 2.0) -> bool:
        """Every follower alive, allowing ``grace_s`` for a death that a failed collective already saw
        to reach the process table."""
        deadline = time.monotonic() + grace_s
        while all(process.is_alive() for process in self.followers):
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.1)
        return False

    def _watch(self) -> None:
        wait_for_sentinels([process.sentinel for process in self.followers])
        if not self._closing.is_set():
            self.abandon()

    def abandon(self) -> NoReturn:
        """A rank died: run ``on_rank_lost`` (hand the running job back), stop the followers, exit.
        Called by the watch thread or by the thread whose collective failed, whichever comes first."""
        with self._abandoning:
            dead = [process.name for process in self.followers if not process.is_alive()]
            log.error("group rank(s) %s died; handing the current job back and stopping the group", dead)
            try:
                self._on_rank_lost()
            except Exception:
                log.exception(
                    "handing the job back failed; the sweeper requeues it once the heartbeat expires"
                )
            self.terminate()
            os._exit(1)

    def terminate(self) -> None:
        self._closing.set()
        for process in self.followers:
            if process.is_alive():
                process.kill()

    def join(self, timeout_s: float = 30) -> None:
        """After a clean stop message: wait for the followers to exit."""
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        for process in self.followers:
            process.join(max(0.0, deadline - time.monotonic()))
        self.terminate()
