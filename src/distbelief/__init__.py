"""distbelief: deep residual networks (He et al., 2015) trained DistBelief-style (Dean et al., 2012)."""

from distbelief.errors import ConfigError, DistbeliefError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DistbeliefError", "__version__"]
