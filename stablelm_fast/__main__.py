"""`python -m stablelm_fast ...` is the `stablelm-fast` command."""

import sys

from stablelm_fast.cli import main

sys.exit(main())
