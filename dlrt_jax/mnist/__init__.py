"""The paper's MNIST application: data, the MLP and LeNet5 models, the training loop and CLI.

Not part of the core library: it needs the ``[mnist]`` extra (``pip install "dlrt-jax[mnist]"``).
Run the main job with ``python -m dlrt_jax.train_mnist`` or ``dlrt-mnist``.

Its three modules load on first use:

* :mod:`dlrt_jax.mnist.data`: the IDX datasets (download, verification, batches);
* :mod:`dlrt_jax.mnist.models`: the MLP and LeNet5 as pure functions of their parameters;
* :mod:`dlrt_jax.mnist.train`: the training loop and the command line.

Examples:
    >>> import dlrt_jax.mnist
    >>> dir(dlrt_jax.mnist)
    ['data', 'models', 'train']
    >>> dlrt_jax.mnist.models.init_mlp.__name__
    'init_mlp'
"""

import importlib

__all__ = ["data", "models", "train"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; it has {__all__}")


def __dir__() -> list[str]:
    return list(__all__)
