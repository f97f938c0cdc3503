"""qoqopt: compressed, verified builds of the QoQ-Med clinical vision-language models."""

__version__ = "0.1.0"
