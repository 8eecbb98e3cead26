"""The paper's MNIST application: data, the MLP and LeNet5 models, the training loop and CLI.

Not part of the core library: it needs the ``[mnist]`` extra (``pip install "dlrt-jax[mnist]"``).
Run the main job with ``python -m dlrt_jax.train_mnist`` or ``dlrt-mnist``.
"""
