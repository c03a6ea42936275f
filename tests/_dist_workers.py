"""Functions run in spawned processes by the multi-rank tests (they must be importable)."""
import os

import torch


def start(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from tmass import dist

    dist.init()


def global_batch_worker(rank: int, world: int, port: int, inputs: dict, out_dir: str, dropout: float = 0.0) -> None:
    """One rank of the global contrastive batch: its b pairs, the loss with gathered features, backward, and
    the gradients averaged over ranks (what DeepSpeed does)."""
    start(rank, world, port)
    import torch.distributed as tdist

    from tmass import dist
    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    torch.manual_seed(0)
    model = TMASS(ModelConfig(clip_arch="tiny", num_frames=4, transformer_dropout=dropout, support_loss_weight=0.8))
    torch.manual_seed(100 + rank)  # the global RNG differs per rank: the dropout mask must not come from it
    b = inputs["ids"].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    out = model(inputs["ids"][sl], inputs["mask"][sl], inputs["video"][sl], inputs["eps"], offset=rank * b,
                gather=dist.gather_with_grad, dropout_stream=(24, "dropout", 3, 0))
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    tdist.all_reduce(loss)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        tdist.all_reduce(g)
        grads[n] = g / world
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):  # three optimiser steps with the averaged gradients, each with its own masks
        if step:
            model.zero_grad()
            model(inputs["ids"][sl], inputs["mask"][sl], inputs["video"][sl], inputs["eps"], offset=rank * b,
                  gather=dist.gather_with_grad, dropout_stream=(24, "dropout", 3 + step, 0))["loss"].backward()
        for p in model.parameters():
            tdist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads, "weights": {n: p.detach().clone() for n, p in
                                                                       model.named_parameters()}},
                   os.path.join(out_dir, "dist.pt"))
    tdist.destroy_process_group()


class TokenEcho(torch.nn.Module):
    """A stand-in model whose text feature is the text's first 8 token ids and whose frames are zeros: lets a
    test check which caption ended up in which row."""

    def __init__(self):
        super().__init__()
        self.dim = 8
        from tmass.config import ModelConfig

        self.cfg = ModelConfig(num_frames=4)

    def encode_text(self, ids, mask):
        return torch.nn.functional.pad(ids[:, :8], (0, max(0, 8 - ids.shape[1])), value=-1).float()

    def encode_frames(self, video):
        return torch.zeros(video.shape[0], 4, 8)


def encode_worker(rank: int, world: int, port: int, shards: list, tokenizer: str, out_dir: str) -> None:
    """encode() on `world` ranks with 2 loader workers each; rank 0 saves what every rank ended up with."""
    start(rank, world, port)
    from tmass.config import DataConfig
    from tmass.data.stream import EvalStream, make_loader
    from tmass.data.tokenizer import load_tokenizer
    from tmass.evaluate import encode

    tok = load_tokenizer(tokenizer)
    ds = EvalStream(shards, DataConfig(input_res=32, num_workers=2), tok, 2, num_frames=4, rank=rank, world=world)
    enc = encode(TokenEcho(), make_loader(ds, 2), torch.device("cpu"))
    if rank == 0:
        torch.save({"text": enc.text, "text_video": enc.text_video, "keys": enc.keys},
                   os.path.join(out_dir, f"enc{world}.pt"))
    import torch.distributed as tdist

    tdist.destroy_process_group()


class FakeEngine:
    """Stands in for DeepSpeed's engine in tmass.checkpoint.save: each rank writes its files as DeepSpeed names
    them. At step 2, `stall` makes rank 1 leave its optimiser file empty and stop itself (SIGSTOP, as a slow
    shared file system looks), and `slow` makes rank 0 write its model file a byte at a time."""

    def __init__(self, rank: int, behaviour: str):
        self.rank, self.behaviour = rank, behaviour

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import signal
        import time

        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        step = client_state["step"]
        optim = os.path.join(folder, f"bf16_zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        if self.behaviour == "stall" and self.rank == 1 and step == 2:
            open(optim, "wb").close()
            os.kill(os.getpid(), signal.SIGSTOP)
        with open(optim, "wb") as f:
            f.write(b"o" * 64)
        if self.rank == 0:
            with open(os.path.join(folder, "mp_rank_00_model_states.pt"), "wb") as f:
                if self.behaviour == "slow" and step == 2:
                    open(os.path.join(save_dir, "writing"), "w").close()
                    for _ in range(100000):
                        f.write(b"m")
                        f.flush()
                        time.sleep(0.01)
                f.write(str(step).encode() * 64)


def checkpoint_worker(rank: int, world: int, port: int, ckpt_dir: str, behaviour: str, steps: int = 2) -> None:
    """Steps 1..steps, each saving `best` (no pointer) and then step{N} (latest), through tmass.checkpoint."""
    start(rank, world, port)
    from tmass import checkpoint

    engine = FakeEngine(rank, behaviour)
    for step in range(1, steps + 1):
        meta = {"step": step, "epoch": 0, "steps_per_epoch": 100}
        checkpoint.save(engine, ckpt_dir, "best", {"step": step}, meta, None, latest=False)
        checkpoint.save(engine, ckpt_dir, f"step{step}", {"step": step}, meta, None)
    import torch.distributed as tdist

    tdist.barrier()
    tdist.destroy_process_group()
    os._exit(0)  # the saves are done; an abort in a library's teardown at exit (seen once) is not under test
