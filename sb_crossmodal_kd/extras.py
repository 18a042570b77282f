"""Optional dependencies, imported where they are needed, naming the pip extra that has them.

Example
-------
>>> require("math").sqrt(4.0)
2.0
>>> require("transformers_not_installed", extra="hf")
Traceback (most recent call last):
...
ImportError: transformers_not_installed is not installed; it comes with the hf extra: pip install 'sb-crossmodal-kd[hf]'
"""

import importlib

__all__ = ["require"]


def require(module, extra="hf"):
    """Imports and returns ``module``; if it is missing, an ImportError names ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed; it comes with the {extra} extra: "
            f"pip install 'sb-crossmodal-kd[{extra}]'"
        ) from error
