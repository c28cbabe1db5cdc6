"""The command ``python -m lora_lab.doctor``; it lives in :mod:`lora_lab.data.doctor`."""

import sys

from lora_lab.data.doctor import main

if __name__ == "__main__":
    sys.exit(main())
