"""fluid: train, sample, evaluate and fit scaling laws for Fluid-style autoregressive image models."""

__version__ = "0.1.0"
