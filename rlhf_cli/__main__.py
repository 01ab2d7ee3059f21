"""``python -m rlhf_cli`` is the ``rlhf`` command (what ``accelerate launch -m rlhf_cli train ...`` runs)."""

import sys

from rlhf_cli.cli import main

if __name__ == "__main__":
    sys.exit(main())
