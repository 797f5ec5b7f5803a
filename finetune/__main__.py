"""`python -m finetune ...` and `accelerate launch -m finetune ...` (each process runs this)."""

import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
