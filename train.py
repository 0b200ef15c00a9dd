"""Train latent diffusion: `python train.py --help`. The program is `jdiff/app/train_cli.py` (installed
as `jdiff-train`); this file runs it from a checkout."""

from jdiff.app.train_cli import run

if __name__ == "__main__":
    run()
