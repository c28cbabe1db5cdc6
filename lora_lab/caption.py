"""The command ``python -m lora_lab.caption``; it lives in :mod:`lora_lab.data.captioner`."""

import sys

from lora_lab.data.captioner import main

if __name__ == "__main__":
    sys.exit(main())
