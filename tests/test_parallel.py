"""run_parallel: results in job order, failures named, and the same numbers as running in this process.

Floats are compared bit for bit only where that is guaranteed (the same process with the same thread count);
across thread counts or processes BLAS may sum in another order, so those comparisons use a tolerance."""
import pytest
import torch

from finer1_lib.parallel import run_parallel, workers_for


def _square(x):
    if x < 0:
        raise ValueError("negative input")
    return x * x


def _tapo_step_weights(folder):
    """One TAPO step of the tiny model with real sampling; (threads, the weights after it)."""
    from finer1_lib.benchmark import build_benchmark
    from finer1_lib.model import build_processor, build_tiny_model, build_tokenizer
    from finer1_lib.profiles import PROFILES
    from finer1_lib.rationale import corpus
    from finer1_lib.tapo import TapoConfig, TapoTrainer
    from finer1_lib.world import World

    profile = PROFILES["smoke"].replace(super_categories=("bird",), test_per_class=1, rl_per_class=1,
                                        reference_per_class=2)
    bench = build_benchmark(profile, folder, 0, progress=False)
    tokenizer = build_tokenizer(corpus(World(0)))
    model = build_tiny_model(tokenizer, "tiny-3m", seed=0)
    cfg = TapoConfig(n1=2, n2=2, prompts_per_step=2, max_new_tokens=8, dynamic_sampling=False, lr=1e-3)
    TapoTrainer(model, build_processor(tokenizer), bench, cfg).step(0)
    return torch.get_num_threads(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # One sampled step at lr 1e-3 moves each weight with a gradient by ~1e-3 (Adam's first step is lr * sign);
        # a different step (other samples, other data) differs by that much. Thread-count noise in the gradient is
        # ~1e-7 relative, but Adam divides by |g| + eps, so on weights whose gradient is near eps it can move the
        # update by a few 1e-5 (measured: 1.8e-5 on a CI run). 2e-4 = a fifth of one step separates the two.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4, msg=lambda m: f"{what}, {k}: {m}")


def test_results_come_back_in_job_order_and_failures_are_named():
    assert run_parallel(_square, {"b": dict(x=3), "a": dict(x=2)}, workers=2) == {"b": 9, "a": 4}
    with pytest.raises(RuntimeError, match=r"_square failed for job 'bad': ValueError: negative input"):
        run_parallel(_square, {"ok": dict(x=1), "bad": dict(x=-1)}, workers=2)
    assert run_parallel(_square, {"a": dict(x=5)}) == {"a": 25}  # one job: in this process


def test_workers_follow_the_cores_and_the_cap(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.delenv("FINER1_WORKERS", raising=False)  # the suite also runs with FINER1_WORKERS=1 or 2
    assert workers_for(1) == 1 and workers_for(3) == 3 and workers_for(9) == 4
    monkeypatch.setenv("FINER1_WORKERS", "2")
    assert workers_for(9) == 2
    monkeypatch.setenv("FINER1_WORKERS", "two")
    with pytest.raises(ValueError, match="FINER1_WORKERS"):
        workers_for(9)


def test_a_worker_with_fewer_threads_gives_the_same_training(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = _tapo_step_weights(tmp_path / "a")
        again = _tapo_step_weights(tmp_path / "a2")
    finally:
        torch.set_num_threads(threads)
    there = run_parallel(_tapo_step_weights, {"w": dict(folder=tmp_path / "b"), "x": dict(folder=tmp_path / "c")},
                         workers=2)
    assert here[0] == 2 and there["w"][0] == there["x"][0] == 1  # two workers on two cores: one thread each
    # same process, same thread count: bit-identical (a guarantee of the code, not of BLAS across machines)
    for k in here[1]:
        assert torch.equal(here[1][k], again[1][k]), k
    # other processes with another thread count: equal up to floating-point summation order
    _assert_close(there["w"][1], there["x"][1], "worker w vs worker x")
    _assert_close(there["w"][1], here[1], "1-thread worker vs 2 threads here")
