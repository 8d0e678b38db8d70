#!/usr/bin/env python
"""Train an ImageNet classifier (MegEngine): argparse -> TrainConfig -> engine.trainer.train."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402  (light: MegEngine is imported only to train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a ResNet/ResNeXt on ImageNet with MegEngine: traced steps, optional "
                    "AMP, one process per GPU. Writes checkpoint.pkl, metrics.jsonl and "
                    "curves.png to the save dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-d", "--data", required=True, metavar="DIR",
                   help="ROOT with train/ and val/: packed shards (meta.json) or raw "
                        "<wnid>/*.JPEG folders")
    p.add_argument("-a", "--arch", default="resnet18", help="model name (engine.models.ARCHS)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per GPU per step")
    p.add_argument("-n", "--ngpus", type=int, default=None,
                   help="GPUs (processes) per node; default: SLURM_GPUS_ON_NODE under Slurm, "
                        "else all visible; 1 process on CPU")
    p.add_argument("-s", "--save-dir", "--save", dest="save_dir", default=None,
                   help="output folder (default: output/<arch>)")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=0.0125,
                   help="learning rate per GPU; the run uses it x world size")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="loader processes per GPU (default: physical cores - 1; 0 = inline)")
    p.add_argument("--image-size", type=int, default=224, help="train/val crop size")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear per-step LR warmup length")
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default="step",
                   help="step: x0.1 at epochs 30/60/80 (scaled to --epochs outside 90-100)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision (float16 autocast + GradScaler); needs a CUDA GPU")
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the train/eval steps with jit.trace(symbolic=True); ignored "
                        "with --dtr")
    p.add_argument("--dtr", nargs="?", const="auto", default=None, metavar="THRESHOLD",
                   help="enable DTR (recompute to save memory); THRESHOLD like 5GB, "
                        "default 80%% of device memory. Runs the steps eagerly (no trace): "
                        "MegEngine only supports DTR in eager mode")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="checkpoint file, or a save dir to continue from its latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-nodes", type=int, default=None,
                   help="machines in a multi-node run (default: from NNODES / WORLD_SIZE, "
                        "SLURM_NNODES, else 1)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this machine's index (default: NODE_RANK / RANK, SLURM_NODEID, else 0)")
    p.add_argument("--master-ip", default=None,
                   help="address of node 0 as every node sees it (default: MASTER_ADDR, the "
                        "first host of SLURM_JOB_NODELIST, else localhost for one node)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on node 0 (default: MASTER_PORT, derived from "
                        "SLURM_JOB_ID, else any free port on one node)")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="multi-node: how long nodes wait for each other at startup before "
                        "stopping with an error that names the missing node")
    p.add_argument("-p", "--print-freq", type=int, default=20,
                   help="steps per metrics record and progress update")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps, for mid-epoch resume (0 = epoch ends)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the per-epoch validation")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (e.g. in log files)")
    return p


def config_from_args(args: argparse.Namespace):
    from engine.trainer import TrainConfig

    return TrainConfig(**vars(args))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from engine.trainer import train

        summary = train(config_from_args(args))
    except UserError as exc:
        print("error: %s" % " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # One line, no traceback; the last checkpoint (epoch end or --save-every) is intact.
        print("interrupted; continue later with --resume %s"
              % (args.save_dir or os.path.join("output", args.arch)), file=sys.stderr)
        return 130
    if summary is not None:  # None on nodes other than node 0
        top = ("  top1 %.3f  top5 %.3f" % (summary["top1"], summary["top5"])
               if summary.get("top1") is not None else "")
        print("done: %d steps, loss %s%s, checkpoint %s"
              % (summary["steps"], "%.4f" % summary["loss"] if summary["loss"] is not None
                 else "-", top, summary["checkpoint"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
