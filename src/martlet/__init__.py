"""Martlet: fine-tune large language models.

Importing this package is cheap on purpose: nothing heavy (torch, transformers) is imported here.
The public Python API of the spec lives in `martlet.llm`.
"""

__version__ = "0.1.0"
