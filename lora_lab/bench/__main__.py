"""``python -m lora_lab.bench``: see :mod:`lora_lab.bench.compare`."""

import sys

from lora_lab.bench.compare import main

sys.exit(main())
