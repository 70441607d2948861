"""`lite-whisper transcribe` on real whisper-base and a few real dev clips: formats, resume, errors, sharding."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lite_whisper import transcribe as tr
from lite_whisper.cli import main
from lite_whisper.distributed import deal
from lite_whisper.text import wer_scores

from conftest import REPO, short_clips

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def _seconds(groups):
    h, m, s, ms = map(int, groups)
    assert m < 60 and s < 60
    return h * 3600 + m * 60 + s + ms / 1000


def parse_srt(text):
    cues = []
    if not text:
        return cues
    assert text.endswith("\n\n")
    for n, block in enumerate(text[:-2].split("\n\n"), 1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, lines[1]
        assert len(lines) == 3 and lines[2].strip() and "-->" not in lines[2]
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), lines[2]))
    return cues


def parse_vtt(text):
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n"):].rstrip("\n").split("\n\n"):
        if not block or block.startswith("NOTE"):
            continue
        lines = block.split("\n")
        m = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert m, lines[0]
        assert len(lines) == 2 and lines[1].strip() and "-->" not in lines[1]
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), lines[1]))
    return cues


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def comparable(records):
    return [{k: r[k] for k in ("file", "text", "segments", "language", "duration")} for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory, dev_rows):
    """inputs/short: 4 real short clips; inputs/long: the shortest long-form clip (English, ~36 s); inputs/bad:
    a corrupt and an empty file."""
    root = tmp_path_factory.mktemp("transcribe")
    short = [r for r in short_clips(dev_rows) if r["condition"] == "real"][:4]
    long = min((r for r in dev_rows if r.get("long_form")), key=lambda r: r["duration_s"])
    for folder, rows in (("short", short), ("long", [long])):
        (root / "inputs" / folder).mkdir(parents=True)
        for r in rows:
            shutil.copy(r["path"], root / "inputs" / folder / Path(r["path"]).name)
    (root / "inputs" / "bad").mkdir()
    (root / "inputs" / "bad" / "corrupt.flac").write_bytes(b"fLaC not really" * 50)
    (root / "inputs" / "bad" / "empty.wav").write_bytes(b"")
    return {"root": root, "short": short, "long": long, "refs": {Path(r["path"]).stem: r["text"] for r in short + [long]}}


@pytest.fixture(scope="module")
def model_dir(whisper_base_dir):
    return str(whisper_base_dir)


@pytest.fixture(scope="module")
def folder_run(data, model_dir):
    """One run over the whole folder, batch size 8: the reference every other test compares against."""
    out = data["root"] / "out-b8"
    code = main(["transcribe", str(data["root"] / "inputs"), "--model", model_dir, "--output-dir", str(out),
                 "--language", "en", "--batch-size", "8", "--no-progress"])
    return {"code": code, "out": out, "records": read_jsonl(out / "transcripts.jsonl")}


def test_folder_run_formats_timestamps_and_errors(folder_run, data):
    out, records = folder_run["out"], folder_run["records"]
    assert folder_run["code"] == 1  # two files failed, the rest went on
    # input order: the folder's files sorted by relative path (bad/ files are errors, not transcripts)
    assert [r["id"] for r in records] == ["long/" + Path(data["long"]["path"]).stem] + sorted(
        "short/" + Path(r["path"]).stem for r in data["short"])
    errors = read_jsonl(out / "errors.jsonl")
    assert sorted(e["id"] for e in errors) == ["bad/corrupt", "bad/empty"]
    assert all(e["error"] and e["file"].endswith((".flac", ".wav")) for e in errors)
    assert "empty" in next(e["error"] for e in errors if e["id"] == "bad/empty")
    assert not list(out.rglob("*.lwtmp"))
    assert not (out / "bad").exists()

    refs = data["refs"]
    assert wer_scores([refs[Path(r["file"]).stem] for r in records], [r["text"] for r in records])["wer"] < 25
    for r in records:
        assert r["language"] == "en" and r["model"] and r["task"] == "transcribe"
        assert r["duration"] == pytest.approx(next(x["duration_s"] for x in data["short"] + [data["long"]]
                                                   if Path(x["path"]).stem == Path(r["file"]).stem), abs=0.01)
        segments = r["segments"]
        assert segments and " ".join(s["text"] for s in segments).split() == r["text"].split()
        starts = [s["start"] for s in segments]
        assert starts == sorted(starts) and starts[0] < 2.0
        for s in segments:
            assert 0 <= s["start"] <= s["end"] <= r["duration"]
        for a, b in zip(segments, segments[1:]):
            assert a["end"] <= b["start"] + 1e-6
        # every per-file format parses and says the same as the JSONL line
        assert (out / f"{r['id']}.txt").read_text() == r["text"] + "\n"
        cues = [s for s in segments if s["text"]]
        for parsed in (parse_srt((out / f"{r['id']}.srt").read_text()), parse_vtt((out / f"{r['id']}.vtt").read_text())):
            assert [c[2] for c in parsed] == [s["text"] for s in cues]
            assert [t for c in parsed for t in c[:2]] == pytest.approx([t for s in cues for t in (s["start"], s["end"])],
                                                                       abs=1e-3)
    # long-form: Whisper's sequential decoding carried the timestamps past the first 30 s window
    long = records[0]
    assert long["duration"] > 30 and long["segments"][-1]["end"] > 30 and len(long["segments"]) >= 5
    summary = json.loads((out / ".lite-whisper" / "summary.json").read_text())
    assert summary["files"] == 7 and summary["transcribed"] == 5 and summary["failed"] == 2
    assert summary["audio_s"] == pytest.approx(sum(r["duration"] for r in records), abs=0.01)


def test_batch_size_one_gives_identical_output(folder_run, data, model_dir):
    out = data["root"] / "out-b1"
    assert main(["transcribe", str(data["root"] / "inputs" / "short"), "--model", model_dir, "--output-dir",
                 str(out), "--language", "en", "--batch-size", "1", "--format", "jsonl", "--no-progress"]) == 0
    batch1 = read_jsonl(out / "transcripts.jsonl")
    assert comparable(batch1) == comparable(folder_run["records"][1:])
    assert not list(out.glob("*.srt"))


def test_resume_after_kill_and_ctrl_c(folder_run, data, model_dir, monkeypatch, capsys):
    """A run killed (SIGKILL) after its first file, then one interrupted (Ctrl-C), then one to the end: exactly one
    complete output per file, nothing transcribed twice, the same transcripts as an uninterrupted run."""
    short = data["short"]
    manifest = data["root"] / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": Path(r["path"]).stem, "audio": str(data["root"] / "inputs" / "short"
                                                                                       / Path(r["path"]).name)}) + "\n"
                                for r in short))
    out = data["root"] / "out-resume"
    args = ["transcribe", str(manifest), "--model", model_dir, "--output-dir", str(out), "--language", "en",
            "--batch-size", "1", "--num-workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lite_whisper.cli", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records_dir = out / ".lite-whisper" / "records"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (records_dir.is_dir() and any(records_dir.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_done = len(list(records_dir.glob("*.json")))
    assert 1 <= killed_done < len(short)
    assert not (out / "transcripts.jsonl").exists()

    real_decode = tr._decode_group
    calls = []

    def decode_then_interrupt(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_decode(*a, **k)

    monkeypatch.setattr(tr, "_decode_group", decode_then_interrupt)
    assert main(args) == 130
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(tr, "_decode_group", real_decode)
    assert len(list(records_dir.glob("*.json"))) == killed_done + 1
    for path in out.iterdir():  # only complete outputs: every subtitle file parses
        if path.suffix == ".srt":
            assert parse_srt(path.read_text())
    assert not list(out.rglob("*.lwtmp"))

    assert main(args) == 0
    summary = json.loads((out / ".lite-whisper" / "summary.json").read_text())
    assert summary["resumed"] == killed_done + 1 and summary["transcribed"] == len(short) - killed_done - 1
    records = read_jsonl(out / "transcripts.jsonl")
    assert [r["id"] for r in records] == [Path(r["path"]).stem for r in short]  # manifest order, once each
    by_file = {r["file"]: r for r in comparable(folder_run["records"])}
    assert comparable(records) == [by_file[r["file"]] for r in comparable(records)]
    for suffix in (".srt", ".vtt", ".txt"):
        assert sorted(p.stem for p in out.glob(f"*{suffix}")) == sorted(r["id"] for r in records)


def test_two_processes_match_one(folder_run, data, model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): the file list is split, the merged transcripts are the same. No
    --language here: each file's language is detected (English), which must not change a transcript."""
    out = tmp_path / "out-2proc"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lite_whisper.cli", "transcribe", str(data["root"] / "inputs"), "--model", model_dir, "--output-dir",
         str(out), "--batch-size", "2", "--num-workers", "0", "--no-progress", "--format", "jsonl"],
        env=env, cwd=str(REPO), capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0 and "2 failed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    parts = list((out / ".lite-whisper" / "parts").glob("*.json"))
    assert len(parts) == 2
    done = [json.loads(p.read_text())["done"] for p in parts]
    assert all(done) and not set(done[0]) & set(done[1])  # both ranks worked, on different files
    assert comparable(read_jsonl(out / "transcripts.jsonl")) == comparable(folder_run["records"])
    assert read_jsonl(out / "errors.jsonl") == read_jsonl(folder_run["out"] / "errors.jsonl")


def test_refuses_to_overwrite_or_escape(folder_run, data, model_dir, tmp_path, capsys):
    inputs = str(data["root"] / "inputs" / "short")
    # another model's (here: other settings') outputs are never replaced silently
    code = main(["transcribe", inputs, "--model", model_dir, "--output-dir", str(folder_run["out"]), "--language",
                 "de", "--no-progress"])
    assert code == 2 and "other settings" in capsys.readouterr().err
    # files not written by lite-whisper transcribe
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    name = Path(data["short"][0]["path"]).stem
    (foreign / f"{name}.srt").write_text("mine")
    assert main(["transcribe", inputs, "--model", model_dir, "--output-dir", str(foreign), "--no-progress"]) == 2
    assert "was not written by lite-whisper transcribe" in capsys.readouterr().err
    assert (foreign / f"{name}.srt").read_text() == "mine"
    # a manifest id that would put an output outside the folder
    manifest = tmp_path / "evil.jsonl"
    manifest.write_text(json.dumps({"id": "../../escaped", "audio": data["short"][0]["path"]}) + "\n")
    assert main(["transcribe", str(manifest), "--model", model_dir, "--output-dir", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "outside the output folder" in capsys.readouterr().err
    assert not (tmp_path / "escaped.srt").exists()
    # bad options: one line, before any model is loaded
    assert main(["transcribe", inputs, "--model", model_dir, "--output-dir", str(tmp_path / "p"),
                 "--format", "srt,docx"]) == 2
    assert main(["transcribe", inputs, "--model", model_dir, "--output-dir", str(tmp_path / "p"),
                 "--no-return-timestamps"]) == 2
    assert main(["transcribe", str(tmp_path / "missing"), "--model", model_dir, "--output-dir", str(tmp_path / "p")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_render_discover_and_deal(tmp_path):
    record = {"text": "a --> b", "model": "m", "segments": [
        {"start": 0.0, "end": 1.5, "text": "a --> b"}, {"start": 1.5, "end": 1.5, "text": " "},
        {"start": 3661.25, "end": 3662.0, "text": "late\nline"}]}
    srt = tr.render(record, "srt")
    assert srt == "1\n00:00:00,000 --> 00:00:01,500\na -> b\n\n2\n01:01:01,250 --> 01:01:02,000\nlate line\n\n"
    assert parse_srt(srt)[1] == (3661.25, 3662.0, "late line")
    assert parse_vtt(tr.render(record, "vtt"))[0] == (0.0, 1.5, "a -> b")
    # keys: relative path without extension; same stem twice gets the extension; the same file twice counts once
    (tmp_path / "d" / "x").mkdir(parents=True)
    for name in ("a.wav", "a.flac", "x/b.mp3", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    items = tr.discover([tmp_path / "d", tmp_path / "d" / "a.wav"])
    assert [(Path(i.file).name, i.key) for i in items] == [("a.flac", "a.flac"), ("a.wav", "a.wav"), ("b.mp3", "x/b")]
    assert deal(list(range(7)), 2) == [0, 1, 1, 0, 0, 1, 1]
    assert deal(list(range(3)), 1) == [0, 0, 0]


def test_chunked_long_form(data, model_dir, tmp_path):
    """--chunk-length: the long clip through the pipeline's chunked mode; real, ordered timestamps, sane text (the
    pipeline merges chunks into fewer, longer segments than sequential decoding)."""
    out = tmp_path / "chunked"
    assert main(["transcribe", str(data["root"] / "inputs" / "long"), "--model", model_dir, "--output-dir", str(out),
                 "--language", "en", "--chunk-length", "30", "--format", "jsonl,srt", "--no-progress"]) == 0
    (record,) = read_jsonl(out / "transcripts.jsonl")
    assert wer_scores([data["long"]["text"]], [record["text"]])["wer"] < 30
    segments = record["segments"]
    assert len(segments) >= 2 and segments[-1]["end"] > 30
    for a, b in zip(segments, segments[1:]):
        assert a["start"] <= b["start"]
    assert all(0 <= s["start"] <= s["end"] <= record["duration"] for s in segments)
    assert [c[2] for c in parse_srt((out / f"{record['id']}.srt").read_text())] == [s["text"] for s in segments if s["text"]]


def test_eval_two_processes_scores_the_gathered_whole(data, model_dir, tmp_path):
    """lite-whisper-eval under torchrun: each process transcribes its share, rank 0 scores all clips."""
    manifest = tmp_path / "eval.jsonl"
    rows = data["short"][:2]
    manifest.write_text("".join(json.dumps({"id": Path(r["path"]).stem, "audio": r["path"], "text": r["text"]}) + "\n"
                                for r in rows))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "lite_whisper.cli", "eval", "--models", model_dir, "--data", str(manifest), "--json", str(tmp_path / "r.json"),
         "--batch-size", "1", "--no-progress"], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| model |") == 1  # only rank 0 reports
    result = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert [u["id"] for u in result["utterances"]] == [Path(r["path"]).stem for r in rows]
    assert all(u["hypothesis"] for u in result["utterances"])
    assert result["words"] == sum(len(r["text"].split()) for r in rows)
    assert result["wer"] == pytest.approx(wer_scores([r["text"] for r in rows],
                                                     [u["hypothesis"] for u in result["utterances"]])["wer"])
    assert result["wer"] < 30
