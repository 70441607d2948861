"""Small shared helpers: logging and all-or-nothing output folders."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging


def get_logger(name):
    return hf_logging.get_logger(name)


def check_output_dir(path, overwrite=False):
    """Raise if `path` exists and is not an empty folder, unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {path} exists and is not empty (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(path, overwrite=False):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on any error it is removed.

    Nothing is written at `path` unless the body finishes, so Ctrl-C or a failure leaves no partial output.
    """
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, backup / "old")
            os.rename(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
