"""The command ``python -m lora_lab.leaderboard``; it lives in :mod:`lora_lab.report.leaderboard`."""

import sys

from lora_lab.report.leaderboard import main

if __name__ == "__main__":
    sys.exit(main())
