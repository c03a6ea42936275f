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


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_the_oracle_ceiling_against_random_rankings(tmp_path, kind):
    """The ceiling's closed forms against 4,000 random rankings that put the fitting candidates first, on a
    built corpus of 24 test videos; fitting found by listing every ordered subsequence of a video's events. A
    corpus whose captions are not those its manifest's options make is refused."""
    import itertools

    from tmass.compare import corpus_events, oracle
    from tmass.errors import DataError
    from tmass.shards.cli import main

    out = tmp_path / kind
    assert main(["--source", "synthetic", "--synthetic_captions", kind, "--out", str(out), "--num_train", "1",
                 "--num_val", "1", "--num_test", "24", "--captions_per_video", "3", "--no_progress"]) == 0
    events, captions = corpus_events(str(out))
    subseqs = [{c for r in range(1, len(ev) + 1) for c in itertools.combinations(ev, r)} for ev in events]
    rng = np.random.default_rng(0)
    t2v, v2t = np.zeros((4000, len(captions))), np.zeros((4000, len(events)))
    for j, (v, named) in enumerate(captions):
        fit = [w for w in range(len(events)) if named in subseqs[w]]
        assert v in fit
        t2v[:, j] = [1 + list(rng.permutation(fit)).index(v) for _ in range(4000)]
    for v in range(len(events)):
        fit = [j for j, (_, named) in enumerate(captions) if named in subseqs[v]]
        for d in range(4000):
            order = rng.permutation(fit)
            v2t[d, v] = 1 + min(k for k, j in enumerate(order) if captions[j][0] == v)
    got = [m for m, _ in oracle(str(out))]
    for (direction, metric), value in zip(METRICS, got):
        ranks = t2v if direction == "t2v" else v2t
        if metric == "MdR":
            assert value == pytest.approx(np.median(ranks.mean(0)), rel=0.05)
        else:
            k = int(metric[2:])
            assert value == pytest.approx(100 * (ranks <= k).mean(), abs=1.0), (direction, metric)
    manifest = json.loads((out / "test.json").read_text())
    manifest["options"]["source_opts"]["seed"] = 1
    (out / "test.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="captions are not those its manifest's options make"):
        oracle(str(out))
