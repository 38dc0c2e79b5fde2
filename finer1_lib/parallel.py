"""Independent runs side by side on a multi-core CPU: spawned worker processes share out the cores.

On the tiny model one process does not use two cores well for generation (2 threads: 1.36x the speed of
one thread, 1.5x for a TAPO step, 1.1x for the CLIP-style baseline's training, on the 2-core reference
machine), so two such runs with one core each finish sooner than the same runs one after another with two
cores each. Batched SFT uses both cores well:
two SFT runs side by side took longer than in turn (notebook 03), so the pipeline trains them in its own
process. Results agree to floating-point rounding: the same process with the same thread count gives
bit-identical numbers, while another thread count or another process may sum in another order (BLAS), which
moves the tiny model's weights by about 1e-7 (bit-identical on the 2-core reference machine, not on every
CPU). On a GPU, or with ``FINER1_WORKERS=1``, jobs run one after another in this process.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Hashable

__all__ = ["workers_for", "run_parallel"]


def workers_for(n_jobs: int) -> int:
    """How many worker processes for ``n_jobs`` jobs: one per core (``FINER1_WORKERS`` caps it), 1 on a GPU."""
    import torch

    if n_jobs <= 1 or torch.cuda.is_available():
        return 1
    cores = os.cpu_count() or 1
    cap = os.environ.get("FINER1_WORKERS")
    if cap is not None:
        if not cap.isdigit() or int(cap) < 1:
            raise ValueError(f"FINER1_WORKERS must be a positive integer, got {cap!r}")
        cores = min(cores, int(cap))
    return max(1, min(n_jobs, cores))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_parallel(fn: Callable, jobs: dict[Hashable, dict], workers: int | None = None,
                 progress: bool = False) -> dict:
    """``{key: fn(**kwargs)}`` for ``jobs = {key: kwargs}``, in parallel worker processes.

    ``fn`` must be importable (a library function, not a notebook's) and its results picklable. The
    workers inherit the environment (profile, run folder) and split the cores evenly. A failed job raises
    a RuntimeError naming it, after the other jobs finish (their results are cached by the pipeline).
    """
    from tqdm.auto import tqdm

    workers = workers or workers_for(len(jobs))
    if workers <= 1:
        return {key: fn(**kwargs) for key, kwargs in jobs.items()}
    threads = max(1, (os.cpu_count() or 1) // workers)
    results, errors = {}, {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, **kwargs): key for key, kwargs in jobs.items()}
        for future in tqdm(as_completed(futures), total=len(futures), desc=getattr(fn, "__name__", "jobs"),
                           disable=not progress):
            key = futures[future]
            try:
                results[key] = future.result()
            except Exception as err:  # noqa: BLE001 -- re-raised below with the job's name
                errors[key] = err
    if errors:
        key, err = next(iter(errors.items()))
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed for job {key!r}: {type(err).__name__}: {err}") from err
    return {key: results[key] for key in jobs}
