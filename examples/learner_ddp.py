"""The digits CNN in fp16 on the Learner: one script for plain python and for torchrun.

    torchrun --standalone --nproc_per_node=2 examples/learner_ddp.py --epochs 2 --save stage1
    torchrun --standalone --nproc_per_node=2 examples/learner_ddp.py --epochs 2 --load stage1
    python examples/learner_ddp.py --epochs 4

Under torchrun the Learner joins the process group, gives each rank its share of every epoch
(`--batch-size` per process), trains through DDP and reduces validation over the ranks; rank
0 prints and writes the checkpoint (runs/models/NAME.pth), which every rank can load.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from mixprec import DataBunch, Learner, accuracy, cleanup_distributed
from mixprec.cli.demo.data import digits_cnn, digits_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save", metavar="NAME")
    parser.add_argument("--load", metavar="NAME")
    args = parser.parse_args()
    torch.set_num_threads(1)

    x_train, y_train, x_valid, y_valid = digits_tensors()
    train = TensorDataset(x_train, y_train)
    shuffle = torch.Generator().manual_seed(0)
    data = DataBunch(
        DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=shuffle),
        DataLoader(TensorDataset(x_valid, y_valid), batch_size=512),
    )
    torch.manual_seed(0)
    learn = Learner(data, digits_cnn(), metrics=[accuracy], path="runs", progress=False)
    learn.to_fp16("dynamic", flat_master=True, growth_interval=50)
    ranks = learn.ranks  # rank 0 of 1 under plain python
    if args.load:
        learn.load(args.load)  # on every rank
    learn.fit(args.epochs)
    valid_loss, valid_accuracy = learn.validate()  # a collective: every rank calls it

    masters = torch.cat([m.detach().reshape(-1) for g in learn.opt.master_params for m in g])
    sums = [masters.double().sum().item()] * ranks.world_size
    if ranks.enabled:
        dist.all_gather_object(sums, sums[0])
    if ranks.is_main:
        print(
            f"{ranks.world_size} process(es), batch {args.batch_size} per process: "
            f"{len(data.train_dl)} steps per epoch on each"
        )
        for epoch, (loss, [acc]) in enumerate(
            zip(learn.recorder.val_losses, learn.recorder.metrics), start=1
        ):
            print(f"epoch {epoch}: valid loss {loss:.4f}  accuracy {acc:.4f}")
        print(
            f"after {learn.epoch} epochs, {learn.iteration} steps: valid loss {valid_loss:.4f}, "
            f"accuracy {valid_accuracy:.4f}, loss scale {learn.opt.loss_scale:g}, "
            f"skipped {learn.recorder.skipped_steps}"
        )
        same = len(set(sums)) == 1
        print(f"fp32 masters identical on every rank: {same} (their sum: {sums[0]!r})")
    if args.save:
        path = learn.save(args.save)  # every rank calls it; rank 0 writes
        if ranks.is_main:
            print(f"saved {path}")


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup_distributed()
