"""depthlab: are the deep layers of a language model doing anything?"""

from depthlab.errors import DepthlabError

__version__ = "0.1.0"

__all__ = ["DepthlabError", "__version__"]
