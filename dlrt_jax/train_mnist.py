"""Alias of :mod:`dlrt_jax.mnist.train`: ``python -m dlrt_jax.train_mnist`` runs the main job."""

import sys

from dlrt_jax.mnist import train as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
