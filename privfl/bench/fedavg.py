"""FedAvg on the embedded synthetic data: Dice per round, no defense (the baseline of attack-vs-dp)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.table import Table

from privfl.bench.common import args_record, console_for, default_out, finish, machine
from privfl.data import SyntheticHistology, partition
from privfl.fl import ClientConfig, run_federated
from privfl.models import build_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="unet")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--samples-per-client", type=int, default=48)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "by_site"])
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="Lightning Fabric accelerator: auto, cpu, cuda")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true")


def run(args: argparse.Namespace) -> int:
    console = console_for(args)
    out = args.out or default_out("fedavg")
    torch.manual_seed(args.seed)
    n = args.clients * args.samples_per_client
    train = SyntheticHistology(n, size=args.size, seed=args.seed, sites=args.clients)
    test = SyntheticHistology(max(16, n // 4), size=args.size, seed=args.seed + 10_000, sites=args.clients)
    clients = partition(train, args.partition, args.clients, seed=args.seed)
    model = build_model(args.model, num_classes=SyntheticHistology.num_classes)
    config = ClientConfig(local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr)
    console.print(
        f"FedAvg: {args.model}, {args.clients} clients ({args.partition}), {args.rounds} rounds, "
        f"{args.size}px, {sum(p.numel() for p in model.parameters()):,} parameters → {out}"
    )
    t0 = time.perf_counter()
    result = run_federated(
        model,
        clients,
        test,
        args.rounds,
        config=config,
        seed=args.seed,
        checkpoint_dir=out / "checkpoint",
        resume=args.resume,
        accelerator=args.device,
        progress=not args.json,
    )
    seconds = time.perf_counter() - t0

    table = Table(title="FedAvg on SyntheticHistology (test split, classes 1..3)")
    for col in ("round", "train loss", "Dice", "Jaccard", "Acc", "s"):
        table.add_column(col, justify="right")
    for rec in result.history:
        t = rec["test"]
        table.add_row(
            str(rec["round"] + 1),
            f"{rec['train_loss']:.4f}",
            f"{t['dice']:.4f}",
            f"{t['jaccard']:.4f}",
            f"{t['accuracy']:.4f}",
            f"{rec['seconds']:.1f}",
        )
    console.print(table)
    record = {
        "args": args_record(args),
        "machine": machine(),
        "seconds": seconds,
        "history": result.history,
    }
    console.print(f"total {seconds:.1f} s")
    return finish(args, console, out / "results.json", record)
