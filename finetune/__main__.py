"""`python -m finetune ...` and `accelerate launch -m finetune ...` (each process runs this)."""

import sys

from finetune.cli import main

sys.exit(main())
