"""Martlet: fine-tune large language models.

Importing this package is cheap on purpose: nothing heavy (torch, transformers) is imported here.
The public Python API of the spec lives in `martlet.llm`.
"""

from martlet.utils import quiet_library_lines

__version__ = "0.1.0"

# Two library lines that tell a user nothing to act on (utils.QUIET_LIBRARY_LINES), dropped before any library
# import can print them: for the Python API (`from martlet.llm import ...`) as for the `martlet` commands.
quiet_library_lines()
