"""`python -m seqmix_jax.generate ...`: the generation CLI (implemented in seqmix_jax/cli/generate.py).

`seqmix_jax.generate` is also the package's generation *function* (bound by seqmix_jax/__init__.py). Running this
file with `-m` does not disturb that: runpy executes it as `__main__`, never as `seqmix_jax.generate`. An explicit
`import seqmix_jax.generate` (pkgutil walks, mock.patch targets, ...) would, however, make Python's import system
set the package attribute `seqmix_jax.generate` to this module. So that the attribute stays usable either way,
this module is made callable: calling it calls `seqmix_jax.models.generate` with the same arguments.
"""

import sys as _sys
import types as _types

from seqmix_jax.cli.generate import main
from seqmix_jax.models.generate import generate as _generate


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _generate(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
else:
    __wrapped__ = _generate  # inspect.signature / help() show the function's signature
    _sys.modules[__name__].__class__ = _CallableModule
