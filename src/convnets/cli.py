"""The thin command-line layer shared by every stage: parse paths, load params, report errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from convnets.errors import ParamsError, PipelineError
from convnets.params import Params, load_params
from convnets.runtime import check_environment


def stage_main(
    description: str,
    positional: Sequence[tuple[str, str]],
    work: Callable[[Params, argparse.Namespace], object],
    argv: Sequence[str] | None = None,
) -> int:
    """Run one stage from the command line; user errors become one line on stderr.

    `positional` lists (name, help) of the path arguments the stage takes;
    `work` receives the validated params and the parsed arguments.
    """
    parser = argparse.ArgumentParser(description=description)
    for name, help_text in positional:
        parser.add_argument(name, help=help_text)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_environment(stage_name(work), Path(args.params).parent)
        params = load_params(args.params)
        work(params, args)
    except ParamsError as exc:
        print(f"error: invalid parameters\n{exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def stage_name(work: Callable) -> str:
    """The stage a work function belongs to: its module's name (dvc.yaml names each stage after it).

    Under `python -m convnets.train` the module is `__main__`; its spec keeps the real name.
    """
    module = sys.modules.get(work.__module__)
    spec = getattr(module, "__spec__", None)
    return (spec.name if spec else work.__module__).rsplit(".", 1)[-1]
