"""The ``tersa`` command line: run recipes, train RAT+ models, evaluate, inspect, list stages."""

from __future__ import annotations

import argparse
import os
import sys

from rich.text import Text

from tersa.errors import TersaError
from tersa.progress import console


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tersa", description="Make large language models smaller and faster."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe and export the compressed model")
    run.add_argument("recipe", help="recipe YAML (see tersa/recipes/)")
    run.add_argument("--output", "-o", help="output folder (default: out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    run.add_argument(
        "--resume",
        action="store_true",
        help="after a crash: reuse the blocks a long stage (qdrop) finished in the work area",
    )

    ev = sub.add_parser("eval", help="perplexity of a model on a text")
    ev.add_argument("model", help="embedded:smollm2-135m, a model folder or a tersa export")
    ev.add_argument(
        "--data", required=True, help="embedded:shakespeare, a local file or a hub name"
    )
    ev.add_argument("--split", help="data split (embedded:shakespeare default: evaluation)")
    ev.add_argument("--text-field", default="text", help="text field of json/jsonl/parquet records")
    ev.add_argument(
        "--seq-len", type=_positive, default=512, help="tokens per window (default 512)"
    )
    ev.add_argument("--max-windows", type=_positive, help="score the first N windows (default all)")
    ev.add_argument(
        "--spread",
        action="store_true",
        help="spread the N windows evenly over the text instead of the first N (as recipes do)",
    )
    ev.add_argument("--batch-size", type=_positive, default=8, help="windows per forward pass")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    tr = sub.add_parser("train", help="train a RAT+ model or its attention twin from a recipe")
    tr.add_argument("recipe", help="training recipe YAML (tersa/recipes/*-shakespeare.yaml)")
    tr.add_argument("--output", "-o", help="output folder (default: out/<recipe name>)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    tr.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of this recipe"
    )
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    st = sub.add_parser(
        "study", help="evaluate a grid of models × quant recipes × KV policies × budgets"
    )
    st.add_argument("study", help="study YAML (models, quant, policies, budgets, contexts, tasks)")
    st.add_argument("--output", "-o", help="output folder (default: out/<study name>)")
    st.add_argument(
        "--fresh", action="store_true", help="discard earlier results instead of resuming them"
    )
    st.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    ins = sub.add_parser("inspect", help="size, bits per parameter and per-layer table of a folder")
    ins.add_argument("folder", help="an export or model folder")

    sub.add_parser("stages", help="list every recipe stage with its fields and defaults")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for any user error, with one message)."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        from tersa import commands

        return getattr(commands, f"cmd_{args.command}")(args)
    except TersaError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written")
        return 130


def _quiet_libraries() -> None:
    """tersa shows its own progress; the libraries' tqdm bars and info logs would interleave."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`tersa inspect DIR | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    entry()
