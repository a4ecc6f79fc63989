"""``python -m train`` == ``condmoe-train`` (what the deepspeed launcher and torchrun run with ``--module``/``-m``)."""

import sys

from train.cli import train_main

sys.exit(train_main())
