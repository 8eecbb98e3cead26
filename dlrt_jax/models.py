"""Alias of :mod:`dlrt_jax.mnist.models` (its old name, kept working)."""

import sys

from dlrt_jax.mnist import models as _module

sys.modules[__name__] = _module
