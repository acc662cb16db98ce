"""python -m experiments NAME... | all [--quick] [--seeds N] [--out DIR] [--text FILE] [--threads N]"""

import sys

from experiments.cli import main

sys.exit(main())
