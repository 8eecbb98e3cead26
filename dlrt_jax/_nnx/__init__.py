"""The implementation of :mod:`dlrt_jax.nnx`, by concern (import the names from there).

* :mod:`~dlrt_jax._nnx.layers`: ``LowRankParam``, the layers and their dense conversions;
* :mod:`~dlrt_jax._nnx.conversion`: ``to_low_rank``, ``to_dense``, the converter registry;
* :mod:`~dlrt_jax._nnx.train`: the optimiser glue, training step and capacity changes;
* :mod:`~dlrt_jax._nnx.io`: checkpoints across capacity changes and the ``U``/``S``/``V`` export.
"""
