"""``python -m lora_lab.report``: see :mod:`lora_lab.report.study`."""

import sys

from lora_lab.report.study import main

sys.exit(main())
