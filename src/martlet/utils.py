"""Small shared helpers."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Martlet's log lines on stdout, once; the libraries' own chatter kept at warnings."""
    logger = logging.getLogger("martlet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[martlet %(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:
        pass
    return logger
