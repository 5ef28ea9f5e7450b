"""Grain worker processes (``data.worker_count``): same batches as in-process, validated count."""
import numpy as np
import pytest
from tiny import tiny_config

from memjax.config import ConfigError, validate
from memjax.data.pipeline import make_dataset


def _batches(cfg, workers: int, n: int) -> list[dict]:
    cfg.data.worker_count = workers
    it = iter(make_dataset(cfg, "train", process_index=0, process_count=1))
    out = [next(it) for _ in range(n)]
    del it  # stops the workers
    return out


def test_worker_count_one_yields_the_in_process_batches():
    cfg = tiny_config("A,A")
    ref = _batches(cfg, 0, 4)
    got = _batches(cfg, 1, 4)
    assert [sorted(b) for b in got] == [sorted(b) for b in ref]
    for r, g in zip(ref, got):
        for k in r:
            np.testing.assert_array_equal(g[k], r[k], err_msg=k)
    # Not a vacuous comparison: consecutive batches differ.
    assert not np.array_equal(ref[0]["inputs"], ref[1]["inputs"])


def test_worker_count_must_be_non_negative():
    cfg = tiny_config("A,A")
    cfg.data.worker_count = -1
    with pytest.raises(ConfigError, match="'data.worker_count'"):
        validate(cfg)
