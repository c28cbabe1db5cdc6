"""``python -m lora_lab.train``: see :mod:`lora_lab.train.loop`."""

import sys

from lora_lab.train.loop import main

sys.exit(main())
