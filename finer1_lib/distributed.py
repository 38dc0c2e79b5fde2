"""TAPO on several processes: ``accelerate launch --num_processes N -m finer1_lib tapo ...`` (data parallel).

What each process does (the trainer is ``tapo.TapoTrainer``; this file only answers "who am I" and holds the
few collective operations it needs):

* **rollouts**: the groups of a round are dealt out round-robin (``share``); a group (its n1 + n2 rollouts,
  its reward mean and std) never leaves the process that generated it;
* **dynamic sampling**: every process learns the accuracies of every group (``gather``), so all agree on which
  groups are kept and keep drawing until the GLOBAL batch holds ``prompts_per_step`` groups;
* **loss**: the token count of a minibatch is summed over processes (``all_sum``) and each process divides its
  share of the token sum by it, so the gradients summed over processes (``sum_grads``) are the one-process
  token-mean gradient; clipping and AdamW then run on identical gradients, and the replicas stay identical;
* **checkpoints**: written by the main process only; they hold no per-process state, so a run resumes under
  any number of processes.

Why no ``DistributedDataParallel`` wrapper: TAPO calls ``generate()`` on the model and runs an uneven number
of micro-batches per process (a process may own no group of a minibatch); one all-reduce of the gradients per
optimizer step is what DDP does, without the wrapper. FSDP (sharded weights) is not supported: the model must
fit one device (use LoRA / QLoRA), or move to the official FSDP stack (``python -m finer1_lib export``).

One process (the default, no launcher) never imports accelerate and every method below is the identity.
On CPU, ``accelerate launch --cpu`` starts ONE process unless MPI is set up (``--mpirun_hostfile``); to test on
CPU launch through torchrun: ``accelerate launch --multi_gpu --num_processes 2`` on a machine without CUDA
(this module then picks the gloo backend), or ``torchrun --nproc_per_node 2``.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["Processes", "processes", "prepare_tapo"]


#: Where launchers put the number of processes: torchrun (``accelerate launch --multi_gpu``), MPI implementations.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class Processes:
    """This process's place among the launched ones (``rank`` of ``world``)."""

    def __init__(self):
        self.rank, self.world, self.state = 0, 1, None
        if max(int(os.environ.get(k, "1")) for k in _WORLD_SIZE_VARS) > 1:  # set by the launcher
            from accelerate import PartialState

            # PartialState reads the launcher's environment, starts the process group (nccl on GPUs, gloo on
            # CPU) and selects this process's GPU, so a later load_model(...) lands on it
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's part of ``items``: every ``world``-th, from position ``rank`` (all of them alone)."""
        return items[self.rank::self.world]

    def gather(self, items: list) -> list:
        """The concatenation of every process's ``items`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over processes (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients over processes, in place. A parameter that got no gradient anywhere keeps
        ``grad=None`` (AdamW then skips it, as in one process); one that got a gradient on some process only
        counts zeros for the others."""
        if self.world == 1:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(has)
        for p, n in zip(params, has.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (e.g. builds a benchmark, trains the SFT model), the others
        after it, then finding its results on disk."""
        if self.world == 1:
            yield
            return
        with self.state.main_process_first():
            yield

    @property
    def _device(self):
        # nccl reduces CUDA tensors only; gloo CPU tensors
        return self.state.device if self.state is not None and self.state.device.type == "cuda" else "cpu"


_PROCESSES: Processes | None = None


def processes() -> Processes:
    """The one :class:`Processes` of this process (the process group is started on the first call)."""
    global _PROCESSES
    if _PROCESSES is None:
        _PROCESSES = Processes()
    return _PROCESSES


def prepare_tapo(profile, out, seed: int, variant: str, n1: int | None, n2: int | None) -> None:
    """Under a launcher, before every process calls ``pipeline.run_tapo``: the main process readies what they
    all then reuse (the benchmark, and the run folder claimed once, so that no two processes create or park it
    at the same time). The CoT-SFT model must be finished already: training it here would keep the other
    processes waiting at a barrier that gives up after minutes; a DataError says how to train it first."""
    from .config import claim_run_folder, read_run_info
    from .io import DataError
    from .pipeline import _run_dir, _tapo_folder, get_benchmark, sft_key, tapo_config, tapo_key

    procs = processes()
    with procs.main_first():
        if not procs.main:
            return
        bench = get_benchmark(profile, out, seed)
        sft = _run_dir(profile, out) / f"sft-cot-seed{seed}"
        if not ((sft / "sft.json").is_file() and (sft / "model").is_dir()
                and (read_run_info(sft) or {}).get("key") == sft_key(profile, out, seed, "cot")):
            raise DataError(f"{sft}: no finished CoT-SFT run of these settings; TAPO on {procs.world} processes "
                            f"starts from one: train it first with one process (`python -m finer1_lib sft "
                            f"--profile {profile.name} --seed {seed}`), then relaunch")
        ratio = {k: v for k, v in (("n1", n1), ("n2", n2)) if v is not None}
        cfg = tapo_config(profile, seed, variant, n_triplets=len(bench.triplets), **ratio)
        claim_run_folder(_run_dir(profile, out) / _tapo_folder(variant, seed, n1, n2),
                         tapo_key(profile, out, seed, variant, n1, n2),
                         {"stage": "tapo", "variant": variant, "config": cfg.to_dict()})
