"""``python -m condmoe.train`` == ``condmoe-train`` (what the deepspeed launcher and torchrun run with
``--module``/``-m``)."""

import sys

if __package__ != "condmoe.train":  # `python -m train` from a checkout: the folder, not the installed package
    sys.exit("condmoe: the training module is condmoe.train now: run `python -m condmoe.train ...` (or condmoe-train)")

from condmoe.train.cli import train_main

sys.exit(train_main())
