"""Output folders never cost the user a file: `--overwrite` replaces only a folder that holds a previous output of
ours (identified by the marker listing the files we wrote), never `.`, a folder containing it, the home folder or a
root, and the old output goes only once the new one is complete."""

import json
import os
from pathlib import Path

import pytest

from lite_whisper.cli import convert_main
from lite_whisper.utils import OUTPUT_MARKER, atomic_output_dir, check_output_dir


def _write(folder, files):
    for name, text in files.items():
        (Path(folder) / name).write_text(text)


def _ours(parent, name="model", files=None):
    """A folder written through atomic_output_dir, as every output of ours is."""
    with atomic_output_dir(Path(parent) / name) as tmp:
        _write(tmp, files or {"model.safetensors": "old weights", "config.json": "{}"})
    return Path(parent) / name


def _tree(folder):
    return {p.name: p.read_text() for p in Path(folder).iterdir()}


def test_output_folder_lists_what_we_wrote(tmp_path):
    folder = _ours(tmp_path)
    marker = json.loads((folder / OUTPUT_MARKER).read_text())
    assert marker["written_by"] == "lite-whisper"
    assert marker["files"] == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_overwrite_replaces_a_previous_output_only_when_complete(tmp_path):
    folder = _ours(tmp_path)
    # A failure (or Ctrl-C) while writing the new output leaves the old one exactly as it was.
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(folder, overwrite=True) as tmp:
            _write(tmp, {"model.safetensors": "new"})
            assert _tree(folder)["model.safetensors"] == "old weights"
            raise KeyboardInterrupt
    assert _tree(folder)["model.safetensors"] == "old weights"
    with atomic_output_dir(folder, overwrite=True) as tmp:
        _write(tmp, {"model.safetensors": "new weights", "README.md": "card"})
        assert _tree(folder)["model.safetensors"] == "old weights"  # untouched until the new output is complete
    assert sorted(_tree(folder)) == sorted(["model.safetensors", "README.md", OUTPUT_MARKER])
    assert _tree(folder)["model.safetensors"] == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_refuses_folders_with_files_we_did_not_write(tmp_path):
    folder = _ours(tmp_path)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        check_output_dir(folder, overwrite=True)
    project = tmp_path / "project"
    project.mkdir()
    _write(project, {"data.csv": "1,2"})
    with pytest.raises(FileExistsError, match="was not written by lite-whisper"):
        check_output_dir(project, overwrite=True)
    # Without --overwrite the message for a foreign folder does not suggest --overwrite; for ours it does.
    with pytest.raises(FileExistsError) as info:
        check_output_dir(project)
    assert "--overwrite" not in str(info.value) and "overwrite=True" not in str(info.value)
    assert "not empty" in str(info.value)
    with pytest.raises(FileExistsError, match="earlier lite-whisper output; pass overwrite=True / --overwrite"):
        check_output_dir(_ours(tmp_path, "other"))
    # A forged marker that does not list a file does not make it ours.
    _write(project, {OUTPUT_MARKER: json.dumps({"written_by": "lite-whisper", "files": []})})
    with pytest.raises(FileExistsError, match="data.csv"):
        check_output_dir(project, overwrite=True)
    assert (project / "data.csv").read_text() == "1,2"


def test_a_file_that_appears_during_the_run_is_kept(tmp_path):
    folder = _ours(tmp_path)
    with pytest.raises(FileExistsError, match="did not write"):
        with atomic_output_dir(folder, overwrite=True) as tmp:
            _write(tmp, {"model.safetensors": "new"})
            (folder / "late.txt").write_text("mine")
    assert _tree(folder)["late.txt"] == "mine" and _tree(folder)["model.safetensors"] == "old weights"


def test_protected_folders_are_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    _write(project, {"data.csv": "1,2"})
    monkeypatch.chdir(project / "src")
    for path, reason in ((".", "is the current folder"), ("..", "contains the current folder"),
                         (str(tmp_path), "contains the current folder"), ("/", "filesystem root"),
                         (os.path.expanduser("~"), "home folder")):
        if reason == "home folder" and Path.cwd().resolve().is_relative_to(Path(path).resolve()):
            reason = "contains the current folder"
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=reason):
                check_output_dir(path, overwrite=overwrite)
    # Even a folder of ours may not be replaced while the user stands in it.
    folder = _ours(project)
    monkeypatch.chdir(folder)
    with pytest.raises(FileExistsError, match="is the current folder"):
        check_output_dir(".", overwrite=True)


def test_cli_overwrite_in_a_project_folder_keeps_every_file(tmp_path, whisper_base_dir, monkeypatch, capsys):
    """The reported data loss: `--output-dir . --overwrite` in a project folder. Now: one line, exit 2, nothing
    touched, and no advice to add --overwrite."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    _write(project, {"data.csv": "1,2"})
    (project / "src" / "main.py").write_text("print('hi')")
    monkeypatch.chdir(project)
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    for extra in ([], ["--overwrite"]):
        code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", ".", "--refine-steps", "0",
                             "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and "is the current folder" in err and "Errno" not in err
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before
    assert (project / "src" / "main.py").read_text() == "print('hi')"
    # a sibling folder with files of the user's: refused with and without --overwrite
    code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", "src", "--overwrite"])
    assert code == 2 and "not written by lite-whisper" in capsys.readouterr().err
    code = convert_main(["--base-model", str(whisper_base_dir), "--output-dir", "src"])
    err = capsys.readouterr().err
    assert code == 2 and "not empty" in err and "--overwrite" not in err
    assert (project / "src" / "main.py").read_text() == "print('hi')"
