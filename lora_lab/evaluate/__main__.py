"""``python -m lora_lab.evaluate``: see :mod:`lora_lab.evaluate.run`."""

import sys

from lora_lab.evaluate.run import main

sys.exit(main())
