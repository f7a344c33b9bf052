"""The multi-process launcher and the parallel-layout checks."""

import os

import pytest

from megatron_refine.runtime import ParallelLayout, RankFailed, initialize, spawn


def _env():
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def _fail_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        raise KeyError("boom on rank one")
    return "ok"


def _die_on_rank_zero():
    if int(os.environ["RANK"]) == 0:
        os._exit(3)


def _hang_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        import time

        time.sleep(60)


def test_spawn_gives_each_rank_torchruns_environment():
    envs = spawn(_env, 3)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of _fail_on_rank_one.*KeyError: 'boom on rank one'"):
        spawn(_fail_on_rank_one, 2)


def test_a_dying_rank_is_reported():
    with pytest.raises(RankFailed, match="rank0 of _die_on_rank_zero died with exit code 3"):
        spawn(_die_on_rank_zero, 2)


def test_a_hanging_rank_times_out():
    with pytest.raises(RankFailed, match=r"timed out after 3s waiting for ranks \[1\]"):
        spawn(_hang_on_rank_one, 2, timeout=3)


@pytest.mark.parametrize(
    "world, tp, pp, cp, expected",
    [(4, 2, 1, 1, 2), (8, 2, 2, 1, 2), (4, 1, 1, 2, 2), (1, 1, 1, 1, 1)],
)
def test_layout_data_parallel_size(world, tp, pp, cp, expected):
    assert ParallelLayout(world, tp, pp, cp).data_parallel_size == expected


def test_layout_not_dividing_world_says_what_to_change():
    with pytest.raises(ValueError, match=r"tp x pp x cp = 3 x 1 x 1 = 3 does not divide the world size 4.*\[1, 2, 4\]"):
        ParallelLayout(4, 3)
    with pytest.raises(ValueError, match="must be a positive integer"):
        ParallelLayout(2, 0)


def _initialize_tp3():
    initialize(tp=3)


def test_initialize_rejects_an_invalid_layout_on_every_rank():
    with pytest.raises(RankFailed, match="does not divide the world size 2"):
        spawn(_initialize_tp3, 2)


def _tensors():
    import torch

    return {"weights": torch.arange(100_000, dtype=torch.float32), "rank": int(os.environ["RANK"])}


def test_tensor_results_survive_the_ranks_exiting():
    """Ranks exit right after reporting; their tensors must arrive intact (no shared-memory handles)."""
    for _ in range(5):
        results = spawn(_tensors, 2)
        assert [r["rank"] for r in results] == [0, 1]
        assert all(float(r["weights"][-1]) == 99_999.0 for r in results)
