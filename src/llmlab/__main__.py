"""`python -m llmlab ...` (and `torchrun ... -m llmlab train ...`) is the `llmlab` command."""
import sys

from llmlab.cli import main

sys.exit(main())
