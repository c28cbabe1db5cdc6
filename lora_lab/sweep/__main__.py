"""``python -m lora_lab.sweep``: see :mod:`lora_lab.sweep.run`."""

import sys

from lora_lab.sweep.run import main

sys.exit(main())
