"""condmoe: DeepSpeed pre-training of sparse generalist models (Uni-Perceiver with conditional MoE, Mod-Squad).

The installed namespace. The code lives in the repository's top-level folders, mapped by setup.cfg's package_dir:
``condmoe.models`` is models/ (architecture only), ``condmoe.train`` is train/ (config, data, DeepSpeed, loop,
evaluation; ``python -m condmoe.train``), ``condmoe.data_prep`` is data_prep/ (``condmoe-prep``).
"""

__version__ = "0.1.0"
