"""Martlet's log lines go to the stdout of the moment they are written."""

from __future__ import annotations

import contextlib
import io
import logging


def test_a_closed_stdout_of_an_earlier_call_is_not_written_to(monkeypatch):
    """A caller (a notebook cell, pytest's capture) that redirected stdout while logging was set up, then closed
    that stream: later lines go to the current stdout, with no 'Logging error' traceback on stderr."""
    from martlet.utils import setup_logging

    logger = logging.getLogger("martlet")
    monkeypatch.setattr(logger, "handlers", [])  # set up anew inside the redirection
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        setup_logging().info("first line")
    first.close()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        logger.info("second line")
    assert out.getvalue() == "[martlet INFO] second line\n"
    assert err.getvalue() == ""
