"""How large the text mass of a trained T-MASS is against its texts, on a test split: for each caption t and its
own video (frames f), the radius R = exp(W S + b) with S = cos(t, f_k) [F], and M stochastic texts
t_s = t + R * eps (eps ~ U[0, 1), the default prior): mean |t|, mean |R * eps|, mean R over D (1.0 at the
radius's initialisation, e^S on the first F dims), and mean cos(t_s, t).

    python bench/mass.py outputs/cmp_partial_s1_tmass 'data/synthetic_partial/test-*.tar'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402


def mass_of(run: str, shards: str, trials: int = 20) -> dict:
    from tmass.checkpoint import load_model
    from tmass.config import ModelConfig, config_of
    from tmass.data.shardlist import expand_shards
    from tmass.data.stream import EvalStream
    from tmass.evaluate import encode, tokenizer_for
    from tmass.model.stochastic import paired_cosines

    model = load_model(ModelConfig(), run)[0].eval()
    cfg = config_of({"num_workers": 0, "test_shards": shards}).resolve(model.clip.config.vision_config.image_size, run)
    stream = EvalStream(expand_shards(shards), cfg.data, tokenizer_for(cfg, run), 32, num_frames=model.cfg.num_frames)
    enc = encode(model, stream, torch.device("cpu"))
    t, f = enc.text.float(), enc.frames[enc.text_video].float()
    with torch.no_grad():
        radius = model.radius(paired_cosines(t, f))  # [N_t, D]
    eps = torch.rand(trials, *t.shape, generator=torch.Generator().manual_seed(0))
    mass = radius[None] * eps
    cos = torch.nn.functional.cosine_similarity(t[None] + mass, t[None].expand_as(mass), dim=-1)
    return {
        "run": run,
        "texts": len(t),
        "dim": t.shape[1],
        "text_norm": round(float(t.norm(dim=-1).mean()), 3),
        "mass_norm": round(float(mass.norm(dim=-1).mean()), 3),
        "mean_radius": round(float(radius.mean()), 4),
        "cos_ts_t": round(float(cos.mean()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run (or export) directories, then the test shards last")
    p.add_argument("--json")
    a = p.parse_args()
    *runs, shards = a.runs
    rows = [mass_of(r, shards) for r in runs]
    print(f"{'run':48}{'|t|':>8}{'|R*eps|':>9}{'mean R':>8}{'cos(t_s,t)':>12}")
    for r in rows:
        print(
            f"{r['run'][-48:]:48}{r['text_norm']:>8.2f}{r['mass_norm']:>9.2f}{r['mean_radius']:>8.3f}"
            f"{r['cos_ts_t']:>12.3f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
