"""tmass.compare's statistics over seeds against numpy on made-up results, and its refusal to pair what is missing."""
import json
import os

import numpy as np
import pytest

from tmass.compare import METRICS, run_dir, summarise


def write(out, corpus, seed, method, values, name="test_results.json"):
    d = run_dir(str(out), corpus, seed, method)
    os.makedirs(d, exist_ok=True)
    r = {"t2v": {}, "v2t": {}}
    for (direction, metric), v in zip(METRICS, values):
        r[direction][metric] = v
    with open(os.path.join(d, name), "w") as f:
        json.dump(r, f)


def test_mean_spread_and_paired_difference_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    tm, xp = rng.uniform(0, 50, (3, 6)), rng.uniform(0, 50, (3, 6))
    for s in range(3):
        write(tmp_path, "partial", s + 1, "tmass", list(tm[s]))
        write(tmp_path, "partial", s + 1, "xpool", list(xp[s]))
    table = summarise(str(tmp_path), "partial", [1, 2, 3])
    (first, base, paired) = table.values()
    np.testing.assert_allclose([m for m, _ in first], tm.mean(0))
    np.testing.assert_allclose([s for _, s in first], tm.std(0, ddof=1))
    np.testing.assert_allclose([m for m, _ in base], xp.mean(0))
    np.testing.assert_allclose([m for m, _ in paired], (tm - xp).mean(0))
    np.testing.assert_allclose([s for _, s in paired], (tm - xp).std(0, ddof=1))
    assert list(table)[-1] == "T-MASS - X-Pool (paired)"


def test_one_seed_has_no_spread_and_a_missing_method_is_not_paired(tmp_path):
    write(tmp_path, "full", 1, "tmass", [1, 2, 3, 4, 5, 6])
    table = summarise(str(tmp_path), "full", [1])
    assert list(table) == ["T-MASS (support loss 0.8, 20 trials, per_text)"]
    assert all(s == 0.0 for _, s in table["T-MASS (support loss 0.8, 20 trials, per_text)"])
    with pytest.raises(KeyError):
        table["T-MASS - X-Pool (paired)"]
