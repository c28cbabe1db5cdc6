"""The command ``python -m lora_lab.inspect``; it lives in :mod:`lora_lab.lora.inspect`."""

import sys

from lora_lab.lora.inspect import main

if __name__ == "__main__":
    sys.exit(main())
