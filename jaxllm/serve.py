"""`python -m jaxllm.serve MODEL [options]`: the same as `jaxllm serve MODEL [options]`."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
