"""moectl: research and train Mixture-of-Experts language models from YAML recipes."""

__version__ = "0.1.0"
