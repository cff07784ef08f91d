"""rlkit: a post-training toolkit for reasoning LLMs, built on Hugging Face TRL."""

__version__ = "0.1.0"
