"""Tensor parallelism across processes.

Rank 0, the driver, lives in the user's process: it schedules, prepares each step's inputs and reads the
sampled tokens. Ranks 1..N-1 are spawned worker processes that run the same device work (their samples go
unread). Each rank holds its shard of every layer and its share of the KV heads; the layers talk over one
process group (NCCL on GPUs, rank r on cuda:r; gloo on the CPU). A step's inputs, with the driver's staged step
buffers, reach each worker pickled through its own pipe: no fixed-size buffer, and a worker blocked on the pipe
sees EOF when the driver goes away. Groups rendezvous through a TCPStore on a free port, so several engines can
live on one host (or in one process: layers keep their own group, never a global one).
"""

import contextlib
import datetime
import os
import pickle
import threading
import time
import traceback
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing.connection import wait

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)  # a hung (not dead) rank; a dead one fails at once
STARTUP_TIMEOUT_S = 300.0
SHUTDOWN_GRACE_S = 5.0
FAILURE_REPORT_WAIT_S = 2.0  # after a failed collective, how long the dead worker gets to show up as dead
# NVLink multicast (NVLS) reserves memory and breaks on shared machines; keep it off unless the user set it.
_NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _process_group(store: dist.Store, rank: int, size: int, device: torch.device):
    store = dist.PrefixStore("nanovllm_tp", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)


def _rank_device(config: Config, rank: int) -> torch.device:
    return torch.device("cuda", rank) if config.device.startswith("cuda") else torch.device(config.device)


class TensorParallelRank:
    """One rank's process group and device; a worker's ModelRunner gets one of these as its tp."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


class TensorParallelDriver(TensorParallelRank):
    """Rank 0: starts the workers, sends them each step, turns any worker failure into a RuntimeError."""

    def __init__(self, config: Config):
        for key, value in _NCCL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        size = config.tensor_parallel_size
        device = _rank_device(config, 0)
        super().__init__(None, device)  # the group forms once the workers are up
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.processes, self.conns = [], []
        self.failure: str | None = None
        # Closing stops the workers; so does garbage collection of the driver and the interpreter's exit.
        self._finalizer = weakref.finalize(self, _stop_workers, self.processes, self.conns)
        for rank in range(1, size):
            conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(config, rank, size, store.port, child_conn, os.getpid()),
                                  name=f"nanovllm-tp-rank{rank}", daemon=True)
            process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(conn)
        self._store = store
        self._watched = self.conns + [p.sentinel for p in self.processes]
        with self.watch():
            self._wait_for_workers(store)
            self.group = _process_group(store, 0, size, device)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _wait_for_workers(self, store: dist.Store) -> None:
        """Each worker checks in before the group forms: one that dies while starting fails fast, not after the
        rendezvous timeout."""
        keys = [f"up{rank}" for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not store.check(keys):
            self.check_workers()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.01)

    def check_workers(self) -> None:
        """Raises a RuntimeError naming the rank if a worker has died or reported an error."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        # One poll() over every pipe (an error report) and process sentinel (an exit): the common case is one call.
        if not wait(self._watched, timeout=0):
            return
        for rank, (process, conn) in enumerate(zip(self.processes, self.conns), start=1):
            reported = None
            with contextlib.suppress(EOFError, OSError):
                if conn.poll():
                    reported = conn.recv()
            if reported is not None or not process.is_alive():
                process.join(FAILURE_REPORT_WAIT_S)
                self.failure = (f"tensor-parallel worker rank {rank} (pid {process.pid}) "
                                + (f"failed:\n{reported}" if reported is not None
                                   else f"died (exit code {process.exitcode})"))
                raise RuntimeError(self.failure)

    @contextlib.contextmanager
    def watch(self):
        """Any exception inside leaves the ranks out of step: the workers are stopped and, if one of them was the
        cause, the error says which."""
        try:
            yield
        except BaseException as error:
            self._abort_nccl()
            deadline = time.monotonic() + FAILURE_REPORT_WAIT_S
            while True:
                try:
                    self.check_workers()
                except RuntimeError as failure:
                    self.close()
                    raise failure from (None if failure is error else error)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            self.failure = f"tensor-parallel engine stopped after an error on rank 0: {error!r}"
            self.close()
            raise

    def run_step(self, inputs, runner: ModelRunner) -> torch.Tensor:
        """Sends the step to the workers, runs rank 0's share; returns the full logits, computed."""
        with self.watch():
            self._send_step(inputs, runner)
            logits = runner.execute(inputs)
            if logits.is_cuda:
                self._wait_for_gpu()
            return logits

    def _wait_for_gpu(self) -> None:
        """NCCL kernels waiting for a dead peer spin forever: wait for the step on the host, watching the workers
        (gloo, on the CPU, fails at once when a peer's socket closes)."""
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            self.check_workers()

    def _send_step(self, inputs, runner: ModelRunner) -> None:
        self.check_workers()
        staged = runner.buffers.host.numpy()[:inputs.staged_bytes]  # the step buffers the driver filled
        payload = pickle.dumps((inputs, staged), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(payload)

    def _abort_nccl(self) -> None:
        """Frees this rank's NCCL communicator at once (kernels stuck waiting for a dead peer included); a
        communicator left to its destructor may wait on peers that are gone."""
        if self.group is not None and self.device.type == "cuda":
            self.group.abort()
            self.group = None

    def close(self) -> None:
        if self.failure is None:
            self.failure = "the tensor-parallel engine is closed"
        self._abort_nccl()
        self.group = None
        self._store = None
        self._finalizer()


def _stop_workers(processes, conns) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send_bytes(b"")  # the stop message
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()


# ---------------------------------------------------------------- worker processes
def _exit_with_parent(parent_pid: int) -> None:
    """A worker stuck in a collective cannot see its pipe close: leave as soon as the driver is gone."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(config: Config, rank: int, size: int, port: int, conn, parent_pid: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        device = _rank_device(config, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            config.device = str(device)
        store = dist.TCPStore("127.0.0.1", port, None, is_master=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        store.set(f"up{rank}", "1")
        runner = ModelRunner(config, TensorParallelRank(_process_group(store, rank, size, device), device))
        with torch.inference_mode():
            while payload := conn.recv_bytes():
                inputs, staged = pickle.loads(payload)
                runner.buffers.load(staged)
                runner.execute(inputs)
        os._exit(0)  # the stop message: nothing to flush, and no process-group teardown to wait on
    except EOFError:  # the driver closed its end without a stop message: it is gone
        os._exit(0)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(traceback.format_exc())
        os._exit(1)
