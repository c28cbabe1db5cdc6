"""``python -m lora_lab.calibrate``: see :mod:`lora_lab.calibrate.run`."""

import sys

from lora_lab.calibrate.run import main

sys.exit(main())
