"""diffattr: which training images made a diffusion model produce this image."""

from diffattr.errors import DiffattrError

__version__ = "0.1.0"

__all__ = ["DiffattrError", "__version__"]
