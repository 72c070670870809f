"""Third-party output to a log file: while a block runs, what the libraries it calls print (Python warnings,
diffusers / transformers logging, tqdm progress bars, torch.onnx's export chatter, ONNX Runtime's and
ffmpeg's C++ output) goes to a file, and the command's own lines go to the terminal (and to the file, so the
log reads in order)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator


def _console_handlers() -> list[logging.StreamHandler]:
    """Every plain logging.StreamHandler with an open stream (what transformers and diffusers attach for
    console output: they bind the sys.stderr of the moment they were set up, which swapping sys.stderr later
    does not reach); file handlers and other subclasses (a test runner's capture) are left alone."""
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    return [h for l in loggers for h in l.handlers
            if type(h) is logging.StreamHandler and not getattr(h.stream, "closed", False)]


@contextlib.contextmanager
def third_party_to_log(path: str | Path) -> Iterator[Callable[[str], None]]:
    """Yield ``say(line)``, which writes to the terminal (the process's stdout as it was) and the log; all
    else written while the block runs goes to the log at ``path`` (appended): file descriptors 1 and 2 (C++
    and child processes), sys.stdout / sys.stderr (print, tqdm), the libraries' console logging handlers and
    warnings.showwarning. Everything is restored on the way out, on errors too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    old_streams = sys.stdout, sys.stderr
    handlers = _console_handlers()
    old_handler_streams = [h.stream for h in handlers]

    def say(line: str) -> None:
        sys.stdout.flush()
        log.write(line + "\n")
        log.flush()
        terminal.write(line + "\n")
        terminal.flush()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    old_show_warning = warnings.showwarning
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    warnings.showwarning = show_warning  # also under a caller's catch_warnings (pytest's, for one)
    for h in handlers:
        h.setStream(log)
    try:
        yield say
    finally:
        log.flush()
        warnings.showwarning = old_show_warning
        for h, stream in zip(handlers, old_handler_streams):
            h.setStream(stream)
        sys.stdout, sys.stderr = old_streams
        for h in _console_handlers():  # set up inside the block (a library imported there): not to the closed log
            if h.stream is log:
                h.setStream(sys.stderr)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()
        log.close()
