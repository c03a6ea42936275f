"""Functions run in spawned processes by the multi-rank tests (they must be importable)."""
import os

import torch


def start(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from tmass import dist

    dist.init()


def global_batch_worker(rank: int, world: int, port: int, inputs: dict, out_dir: str) -> None:
    """One rank of the global contrastive batch: its b pairs, the loss with gathered features, backward, and
    the gradients averaged over ranks (what DeepSpeed does)."""
    start(rank, world, port)
    import torch.distributed as tdist

    from tmass import dist
    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    torch.manual_seed(0)
    model = TMASS(ModelConfig(clip_arch="tiny", num_frames=4, transformer_dropout=0.0, support_loss_weight=0.8))
    b = inputs["ids"].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    out = model(inputs["ids"][sl], inputs["mask"][sl], inputs["video"][sl], inputs["eps"], offset=rank * b,
                gather=dist.gather_with_grad)
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    tdist.all_reduce(loss)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        tdist.all_reduce(g)
        grads[n] = g / world
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    tdist.destroy_process_group()
