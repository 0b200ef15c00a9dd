"""Generate images: `python sample.py --help`. The program is `jdiff/app/sample_cli.py` (installed as
`jdiff-sample`); this file runs it from a checkout, and tests import its functions from here."""

from jdiff.app.sample_cli import main, parse_args, parse_lora, run

__all__ = ["main", "parse_args", "parse_lora", "run"]

if __name__ == "__main__":
    run()
