"""Small shared helpers."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Martlet's log lines on stdout, once; the libraries' own chatter kept at warnings."""
    logger = logging.getLogger("martlet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[martlet %(levelname)s] %(message)s"))
        logger.addHandler(handler)
        # under torchrun the other ranks only speak up for warnings
        logger.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
        logger.propagate = False
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:
        pass
    return logger
