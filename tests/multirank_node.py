"""One node of a multi-rank test run: the train tool's main, with three small hooks in its ranks.

    python tests/multirank_node.py DUMP_DIR [train.py arguments...]

The ranks are forked by the engine's own launch path (engine.dist.ranks) exactly as in a user's
run; the hooks only observe or inject:
- each rank writes DUMP_DIR/rank-R.step ("pid step") as it starts each step, so a test can
  tell that training is under way and which process to kill;
- at the end each rank saves its parameters to DUMP_DIR/rank-R.npz (only rank 0 writes a
  checkpoint, and the tests compare every rank);
- ENGINE_TEST_FAIL="RANK:STEP:KIND" makes that rank raise at that step: KIND "user" raises a
  UserError (as a full disk at a checkpoint would), "bug" a ZeroDivisionError.
The node's exit status and stderr are the train tool's own.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install_hooks(dump: str) -> None:
    import numpy as np

    from engine import dist, loop
    from engine.errors import UserError

    fail = os.environ.get("ENGINE_TEST_FAIL")
    fail_rank, fail_step, fail_kind = fail.split(":") if fail else (None, None, None)
    models = []
    real_model, real_worker, real_lr = (loop._model_and_optimizer, loop.run_rank,
                                        loop.lr_at)

    def model_and_optimizer(*args, **kwargs):
        out = real_model(*args, **kwargs)
        models.append(out[0])
        return out

    def lr_at(step, **kwargs):
        rank = dist.get_rank()
        with open(os.path.join(dump, "rank-%d.step" % rank), "w") as f:
            f.write("%d %d" % (os.getpid(), step))
        if fail and rank == int(fail_rank) and step == int(fail_step):
            if fail_kind == "user":
                raise UserError("cannot write /scratch/run/checkpoint.pkl: the disk is full")
            1 / 0
        return real_lr(step, **kwargs)

    def worker(cfg, sources=(), start=None):
        summary = real_worker(cfg, sources, start)
        params = {name: p.numpy() for name, p in models[-1].named_parameters()}
        np.savez(os.path.join(dump, "rank-%d.npz" % dist.get_rank()), **params)
        return summary

    loop._model_and_optimizer = model_and_optimizer
    loop.run_rank = worker
    loop.lr_at = lr_at


if __name__ == "__main__":
    dump_dir = sys.argv[1]
    os.makedirs(dump_dir, exist_ok=True)
    install_hooks(dump_dir)
    from engine.tools.train import main

    sys.exit(main(sys.argv[2:]))
