"""Model-state memory per rank: T-MASS ViT-B/16 and ViT-L/14 under ZeRO-1/2/3 and CPU offload, from DeepSpeed's
estimators (no GPU needed; activations are not included: they grow with the batch and are measured on a GPU).

    python bench/memory.py                              # B/16 and L/14; 8 GPUs per node, on 1 and 8 nodes
    python bench/memory.py --archs tiny --json m.json   # what the tests run

Psi is the number of parameters (T-MASS: both CLIP towers, the pooling and the radius; all are trained), N the
number of GPUs. bf16 training keeps per rank, in bytes:
    ZeRO-1   2 Psi (bf16 weights) + 2 Psi (bf16 gradients) + 16 Psi / N (fp32 gradients, weights, Adam m and v)
             (DeepSpeed has no ZeRO-1 estimator; these are the ZeRO-2 estimator's terms with the bf16 gradients
             whole on every rank, as ZeRO-1 keeps them)
    ZeRO-2   deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs: 2 Psi + 18 Psi / N
    ZeRO-3   deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs: 4 L + 18 Psi / N, L the largest
             layer's parameters (gathered whole while it runs)
and with offload (zero2_offload.json, zero3_offload.json) the optimiser (and under ZeRO-3 the weights) move to
the CPU. The CPU column is the estimators' per-node need with their 1.5x buffer factor: without offload, what
loading the model takes on every rank of the node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

GB = 2**30


def count(arch: str) -> tuple[int, int]:
    """(parameters, parameters of the largest module's own tensors) of T-MASS with this CLIP, built on the meta
    device (no memory, no weights)."""
    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    with torch.device("meta"):
        model = TMASS(ModelConfig(clip_arch=arch))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def states(total: int, largest: int, gpus_per_node: int, nodes: int) -> list[dict]:
    """Per-GPU and per-node CPU bytes of the model states under each setting."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = gpus_per_node * nodes
    kw = dict(num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    rows = [("ZeRO-1", total * 4 * gpus_per_node * 1.5, 4 * total + int(16 * total / n))]  # CPU: as ZeRO-2's
    rows.append(("ZeRO-2", *estimate_zero2_model_states_mem_needs(total, cpu_offload=False, **kw)))
    rows.append(("ZeRO-2 + offload optimiser", *estimate_zero2_model_states_mem_needs(total, cpu_offload=True, **kw)))
    z3 = estimate_zero3_model_states_mem_needs
    rows.append(("ZeRO-3", *z3(total, largest, cpu_offload=False, **kw)[:2]))
    rows.append(
        ("ZeRO-3 + offload optimiser", *z3(total, largest, cpu_offload=True, cpu_offload_params=False, **kw)[:2])
    )
    rows.append(("ZeRO-3 + offload all", *z3(total, largest, cpu_offload=True, cpu_offload_params=True, **kw)[:2]))
    return [{"setting": s, "gpus": n, "gpu_bytes": int(g), "cpu_bytes_per_node": int(c)} for s, c, g in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="ViT-B/16,ViT-L/14")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--nodes", default="1,8", help="comma-separated node counts")
    p.add_argument("--json")
    a = p.parse_args()
    out = []
    for arch in a.archs.split(","):
        total, largest = count(arch)
        for nodes in map(int, a.nodes.split(",")):
            for row in states(total, largest, a.gpus_per_node, nodes):
                out.append({"arch": arch, "params": total, "largest_layer_params": largest, **row})
    print("T-MASS model states per GPU (bf16 weights and gradients, fp32 Adam), DeepSpeed's estimators; activations")
    print("are not included. CPU: per node, with the estimators' 1.5x buffer factor.")
    print(f"{'arch':>10} {'params':>8} {'GPUs':>5} {'setting':>27} {'GPU GB':>7} {'CPU GB/node':>11}")
    for r in out:
        print(
            f"{r['arch']:>10} {r['params'] / 1e6:>7.1f}M {r['gpus']:>5} {r['setting']:>27} "
            f"{r['gpu_bytes'] / GB:>7.2f} {r['cpu_bytes_per_node'] / GB:>11.1f}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
