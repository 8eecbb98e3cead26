"""Alias of :mod:`dlrt_jax.mnist.data` (its old name, kept working)."""

import sys

from dlrt_jax.mnist import data as _module

sys.modules[__name__] = _module
