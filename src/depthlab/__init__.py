"""depthlab: are the deep layers of a language model doing anything?"""

__version__ = "0.1.0"
