"""The `jaxllm` console script: `jaxllm serve MODEL ...`, `jaxllm bench {throughput,latency,sweep,serve} ...`.

Each subcommand lives in its own module, imported only when it runs (so `jaxllm bench --help`
never pays for the server's imports and vice versa). A subcommand module provides
`add_arguments(parser: argparse.ArgumentParser) -> None` and `main(args: argparse.Namespace) -> int`.
Host only: never imports jax itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). A module that is not there yet is reported, not hidden.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("jaxllm.entrypoints.openai.cli", "serve a model behind the OpenAI API (FastAPI + uvicorn)"),
    "bench": ("jaxllm.bench.cli", "benchmarks: throughput, latency, sweep, serve"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        # Only the chosen subcommand's module is imported; for --help or a typo, list them all.
        names = ", ".join(SUBCOMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jaxllm: unknown command {argv[0]!r}; choose one of: {names}", file=sys.stderr)
            return 2
        print(f"usage: jaxllm {{{','.join(SUBCOMMANDS)}}} ...\n")
        for name, (_, help_text) in SUBCOMMANDS.items():
            print(f"  {name:8s} {help_text}")
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"jaxllm {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
