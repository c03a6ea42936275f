"""GPU benchmark: one prepared script, under 10 minutes on one GPU (`python bench/gpu_train.py`).

1. Training-step throughput (clips/s) and model FLOP utilisation of T-MASS, ViT-B/16, 12 frames, 224x224, bf16,
   random weights and in-memory data, through the DeepSpeed engine as tmass trains (ZeRO-1 and ZeRO-2, with and
   without activation checkpointing, eager and compiled per layer and per tower, SDPA attention and fused AdamW;
   then eager attention and the default AdamW kernel one at a time), at the largest per-GPU batch of
   16/32/64/96/128 that fits. FLOPs are counted
   from the model's shapes (printed). The same model trained as upstream trains it (fp32, plain PyTorch AdamW,
   batch 32, no ZeRO) gives the baseline ratio.
2. The sharded evaluation of 1k x 1k with 20 trials (time, peak GPU memory): per_text, then per_pair (compiled,
   the first chunk's compilation included).
3. The data pipeline on this machine's CPU cores, from local shards it builds: clips/s against the step's
   clips/s, i.e. whether the GPU would wait.
Writes a JSON (--json) and prints a table. Without a GPU: `python bench/gpu_train.py --cpu --tiny` runs the same
code paths on a tiny model (the tests do).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def tower_flops(tokens: int, width: int, layers: int, mlp: int) -> float:
    """Forward FLOPs of one transformer tower on one sequence: QKV/O projections, attention, MLP."""
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return layers * per_layer


def step_flops(model, batch: int, frames: int, text_len: int) -> float:
    """Forward + backward FLOPs (3 x forward) of one training step of one rank at this batch."""
    v, t = model.clip.config.vision_config, model.clip.config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = tower_flops(patches + 1, v.hidden_size, v.num_hidden_layers, v.intermediate_size)
    vision += 2 * patches * 3 * v.patch_size**2 * v.hidden_size  # patch embedding
    text = tower_flops(text_len, t.hidden_size, t.num_hidden_layers, t.intermediate_size)
    d = model.dim
    head = 2 * batch * batch * (2 * frames * d + 2 * d * d) + 2 * batch * frames * 3 * d * d  # pooling, both passes
    return 3 * (batch * frames * vision + batch * text + head)


def make_batch(model, batch: int, frames: int, device, text_len: int = 32):
    res = model.clip.config.vision_config.image_size
    ids = torch.randint(0, model.clip.config.text_config.vocab_size - 2, (batch, text_len), device=device)
    ids[:, -1] = model.clip.config.text_config.eos_token_id
    video = torch.randn(batch, frames, 3, res, res, device=device)
    eps = torch.rand(batch, model.dim, device=device)
    return ids, torch.ones_like(ids), video, eps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def new_model(arch: str, frames: int, ckpt: bool, compile: str = "no", attn: str = "sdpa"):
    """compile: "no", or the --compile_scope ("layers", "towers"); attn: the --attn_implementation."""
    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    torch.manual_seed(0)
    return TMASS(
        ModelConfig(
            clip_arch=arch,
            num_frames=frames,
            grad_checkpointing=ckpt,
            transformer_dropout=0.3,
            compile=compile != "no",
            compile_scope="layers" if compile == "no" else compile,
            attn_implementation=attn,
        )
    )


def deepspeed_run(arch, frames, batch, setting: dict, precision, device, warmup, steps) -> dict:
    """One setting ({zero, checkpointing, compile, attention, adamw}) at one per-GPU batch, through the engine."""
    import deepspeed

    from tmass.config import Config
    from tmass.engine import make_adamw, param_groups

    model = new_model(arch, frames, setting["checkpointing"], setting["compile"], setting["attention"])
    ds = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": setting["zero"]},
        "steps_per_print": 10**9,
        "bf16": {"enabled": precision == "bf16"},
    }
    cfg = Config().replace(train={"adamw": setting["adamw"]})
    opt = make_adamw(param_groups(model, cfg), cfg, device.type == "cuda")  # the groups and kernel of training
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    ids, mask, video, eps = make_batch(engine.module, batch, frames, device)
    video = video.to(next(engine.module.parameters()).dtype)

    def step():
        out = engine(ids, mask, video, eps)
        engine.backward(out["loss"])
        engine.step()

    try:
        dt = time_steps(step, device, warmup, steps)
        flops = step_flops(engine.module, batch, frames, ids.shape[1])
    finally:
        del engine, model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"step_s": dt, "clips_per_s": batch / dt, "flops_per_step": flops, "tflops": flops / dt / 1e12}


def upstream_run(arch, frames, batch, device, warmup, steps) -> dict:
    """fp32, plain PyTorch, no ZeRO: how upstream trains."""
    model = new_model(arch, frames, False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-6, weight_decay=0.2)
    ids, mask, video, eps = make_batch(model, batch, frames, device)

    def step():
        out = model(ids, mask, video, eps)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    try:
        dt = time_steps(step, device, warmup, steps)
    finally:
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"step_s": dt, "clips_per_s": batch / dt}


def device_matmul_rate(device, size: int = 8192, repeats: int = 5) -> float:
    """The device's fp32 matmul rate (FLOP/s): the best of `repeats` size x size products, as the scoring runs."""
    if device.type == "cpu":
        from eval import matmul_rate

        return matmul_rate(torch.get_num_threads())
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def eval_run(n: int, trials: int, device, noise: str = "per_text") -> dict:
    """The sharded scoring of n x n random features, with its time over the floor (bench/eval.py's FLOP count at
    the device's fp32 matmul rate)."""
    from eval import Head, scoring_flops  # bench/eval.py: the pooling and radius of T-MASS without the towers

    from tmass.config import EvalConfig
    from tmass.evaluate import Encoded, rank_all

    head = Head().to(device)
    g = torch.Generator().manual_seed(0)
    enc = Encoded(
        torch.randn(n, 512, generator=g).to(device),
        torch.randn(n, 12, 512, generator=g).to(device),
        torch.arange(n, device=device),
        [],
        {},
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    chunk = 1 << 18 if device.type == "cuda" else 16384
    r = rank_all(head, enc, EvalConfig(stochastic_trials=trials, trial_noise=noise, eval_chunk=chunk), 24)
    sync(device)
    out = {
        "n": n,
        "trials": trials,
        "noise": noise,
        "seconds": time.perf_counter() - t,
        "compiled": r["compiled"],
        "first_chunk_s": r["first_chunk_s"],
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    rate = device_matmul_rate(device)
    out |= {"matmul_tflops": rate / 1e12, "x_floor": out["seconds"] / (scoring_flops(n, n, trials) / rate)}
    return out


def loader_shards(out: str, workers: int, seconds: float) -> list[str]:
    """Shards of 32 generated 640x360 30 fps clips, built into `out` unless they are there already (the GPU machine
    gets them built on another machine, as a cluster gets them on shared storage)."""
    manifest = os.path.join(out, "s", "train.json")
    if not os.path.exists(manifest):
        from build_shards import clip_corpus
        from tmass.shards.build import BuildConfig, build
        from tmass.shards.sources import SourceOptions

        vids, csv, _ = clip_corpus(out, [seconds] * 32, "a red box")
        build(
            BuildConfig(
                source="csv",
                out=os.path.join(out, "s"),
                splits=["train"],
                workers=workers,
                max_count=2,
                progress=False,
                source_opts=SourceOptions(anno=csv, videos_dir=vids),
            )
        )
    with open(manifest) as f:
        return [os.path.join(out, "s", s["shard"]) for s in json.load(f)["shards"]]


PARTS = ("eval", "train", "upstream", "loader")  # in the order they run


def train_settings(no_compile: bool) -> list[dict]:
    """The sweep: ZeRO-1 and ZeRO-2, with and without activation checkpointing, eager and compiled per layer and
    per tower, all with SDPA attention and fused AdamW on CUDA; then, at the batch of ZeRO-2 without
    checkpointing, one option changed at a time (eager attention; torch's default AdamW kernel)."""
    base = {"zero": 2, "checkpointing": False, "compile": "no", "attention": "sdpa", "adamw": "auto"}
    out = [base | {"zero": 1}, base | {"zero": 1, "checkpointing": True}, base, base | {"checkpointing": True}]
    if not no_compile:
        for scope in ("layers", "towers"):
            out += [base | {"compile": scope}, base | {"compile": scope, "checkpointing": True}]
    out += [base | {"attention": "eager", "at_best": True}, base | {"adamw": "foreach", "at_best": True}]
    return out


def label(setting: dict) -> str:
    return (
        f"ZeRO-{setting['zero']} ckpt={setting['checkpointing']} compile={setting['compile']} "
        f"attention={setting['attention']} adamw={setting['adamw']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU here)")
    p.add_argument("--tiny", action="store_true", help="the tiny model and small sizes (what the tests run)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--batches", default=None, help="per-GPU batches to try, ascending (default 16,32,64,96,128)")
    p.add_argument(
        "--loader_shards",
        default=None,
        help="folder of the loader's shards, built there if absent (default: a temporary folder)",
    )
    p.add_argument("--no_compile", action="store_true", help="skip the runs with --compile (per layer, per tower)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    p.add_argument("--json", default="gpu_train.json")
    a = p.parse_args()
    parts = a.parts.split(",")
    if bad := [x for x in parts if x not in PARTS]:
        p.error(f"unknown --parts {bad}; choose from {','.join(PARTS)}")
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    os.environ.setdefault("RANK", "0"), os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tmass import dist

    dist.init()
    arch, frames = ("tiny", 4) if a.tiny else ("ViT-B/16", 12)
    batches = [int(b) for b in a.batches.split(",")] if a.batches else [2, 4] if a.tiny else [16, 32, 64, 96, 128]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    precision = "bf16"
    results = {
        "device": name,
        "torch": torch.__version__,
        "arch": arch,
        "frames": frames,
        "peak_tflops": peak,
        "train": [],
        "upstream": None,
    }
    warmup = 1 if a.tiny else 2
    t_start = time.perf_counter()

    def save(part: str) -> None:  # after every part, so that a run cut short keeps what it measured
        print(f"[{time.perf_counter() - t_start:6.1f} s] {part} done", file=sys.stderr, flush=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)

    if "eval" in parts:
        results["eval"] = eval_run(100 if a.tiny else 1000, 4 if a.tiny else 20, device)
        results["eval_per_pair"] = eval_run(100 if a.tiny else 1000, 4 if a.tiny else 20, device, "per_pair")
        save("eval")
    if "train" in parts:
        fitted = {}  # activation checkpointing -> the largest batch that fitted without compile
        for setting in train_settings(a.no_compile):
            ckpt = setting["checkpointing"]
            if setting.pop("at_best", False):  # one option changed from the default: at the default's batch
                tries = [fitted[ckpt]] if ckpt in fitted else []
            elif setting["compile"] != "no" and ckpt in fitted:
                tries = batches[batches.index(fitted[ckpt]) :]
            else:
                tries = batches
            best = None
            for b in tries:
                oom = False
                try:
                    r = deepspeed_run(arch, frames, b, setting, precision, device, warmup, a.steps)
                except torch.OutOfMemoryError:
                    oom = True  # handled outside the except block, once its frames (and tensors) are gone
                if oom:
                    gc.collect()
                    torch.cuda.empty_cache()
                    break
                best = {**setting, "batch": b, **r}
                if peak:
                    best["mfu"] = r["tflops"] / peak
                print(
                    f"  {label(setting)} batch {b}: {r['clips_per_s']:.1f} clips/s, {r['tflops']:.1f} TFLOP/s",
                    file=sys.stderr,
                    flush=True,
                )
            if best:
                results["train"].append(best)
                if setting["compile"] == "no":
                    fitted.setdefault(ckpt, best["batch"])
        save("train")
    if "upstream" in parts:
        up_batch = 2 if a.tiny else 32
        oom = False
        try:
            results["upstream"] = {"batch": up_batch, **upstream_run(arch, frames, up_batch, device, warmup, a.steps)}
        except torch.OutOfMemoryError:
            oom = True
        if oom:
            results["upstream"] = {"batch": up_batch, "error": "out of memory"}
            gc.collect()
            torch.cuda.empty_cache()
        save("upstream")
    if "loader" in parts:
        workers = 1 if a.tiny else max(1, (os.cpu_count() or 2) - 2)
        res, batch, seconds = (32, 4, 1.0) if a.tiny else (224, 32, 10.0)
        from loader import time_shards  # bench/loader.py: the same stream, timed
        from tmass.data.tokenizer import build_caption_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            urls = loader_shards(a.loader_shards or tmp, workers, seconds)
            rate = time_shards(
                urls, build_caption_tokenizer(["a red box"]), 4 * workers * batch, batch, frames, res, workers
            )
            results["loader"] = {"workers": workers, "batch": batch, "clips_per_s": rate}
        save("loader")

    print(f"\nT-MASS {arch}, {frames} frames, {precision}, on {name} (torch {torch.__version__})")
    if results["train"]:
        f0 = results["train"][0]["flops_per_step"] / results["train"][0]["batch"]
        print(f"model FLOPs per clip (forward + backward): {f0 / 1e9:.3f} GFLOP, counted from the shapes")
        print(
            f"{'ZeRO':>4} {'ckpt':>5} {'compile':>7} {'attention':>9} {'adamw':>7} {'batch':>5} {'clips/s':>8} "
            f"{'TFLOP/s':>8} {'MFU':>6}"
        )
    for r in results["train"]:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(
            f"{r['zero']:>4} {str(r['checkpointing']):>5} {r['compile']:>7} {r['attention']:>9} {r['adamw']:>7} "
            f"{r['batch']:>5} {r['clips_per_s']:>8.2f} {r['tflops']:>8.2f} {mfu:>6}"
        )
    up = results["upstream"]
    if up and "clips_per_s" in up:
        line = f"upstream-style fp32 plain PyTorch, batch {up['batch']}: {up['clips_per_s']:.2f} clips/s"
        if results["train"]:
            best = max(results["train"], key=lambda r: r["clips_per_s"])
            line += f"; best tmass setting is {best['clips_per_s'] / up['clips_per_s']:.2f}x"
        print(line)
    elif up:
        print(f"upstream-style fp32 plain PyTorch, batch {up['batch']}: {up['error']}")
    for e in (results.get("eval"), results.get("eval_per_pair")):
        if e:
            print(
                f"evaluation {e['n']} x {e['n']}, {e['trials']} trials, {e['noise']}: {e['seconds']:.2f} s"
                + (f" (compiled; its first chunk {e['first_chunk_s']:.2f} s)" if e["compiled"] else "")
                + (f", peak GPU memory {e['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in e else "")
                + f"; {e['x_floor']:.1f}x the floor ({e['matmul_tflops']:.1f} TFLOP/s fp32 matmul)"
            )
    if lr := results.get("loader"):
        best_rate = max((r["clips_per_s"] for r in results["train"]), default=None)
        line = f"data pipeline, {lr['workers']} workers: {lr['clips_per_s']:.1f} clips/s"
        if best_rate:
            line += (
                f" vs the step's {best_rate:.1f}: "
                f"{'the GPU waits' if lr['clips_per_s'] < best_rate else 'the GPU does not wait'}"
            )
        print(line)
    save("all")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
