"""data_prep.py - turn data into the standard layout (see common.py's docstring and the README).

    python data_prep.py synth --out ROOT                     the built-in synthetic benchmark
    python data_prep.py videos SRC --out ROOT [--sr 16000] [--time middle|SECONDS] [--workers N]
                                                             a folder of videos (VGG-Sound style <ytid>_<start:06d> names or any)
    python data_prep.py frames SRC --out ROOT [--sr 16000]   frames (jpg/png) + audio (wav/flac/mp3/m4a) already extracted
    python data_prep.py flickr SRC --out ROOT                the Flickr-SoundNet test download (Data/... + Annotations/*.xml)
    python data_prep.py vggss --json vggss.json --clips ROOT the VGG-SS test split + annotations from the clips present
      [--heard-lists vggss_heard.txt vggss_heard_test.csv vggss_unheard_test.csv]  + the heard/unheard splits
    python data_prep.py avsbench SRC --subset s4|ms3 --out ROOT [--whole-clip]   AVSBench-object v1 test masks
    python data_prep.py is3 SRC --out ROOT [--boxes synthetic3240_bbox.json]    IS3 (two sources per image)
    python data_prep.py split LIST --name NAME --root ROOT   any id list (*.txt / *.csv) as ROOT/splits/NAME.txt
    python data_prep.py check ROOT [--split NAME] [--method M] [--workers N]  decode every frame and WAV as the
                                                             methods read them (before a long run)
    python data_prep.py video OUT.mkv [--size 640x360] [--seconds S] [--fps N]  a synthetic video: an object
                                                             sounds as it crosses the frame beside a silent one

The synthetic benchmark's generator lives here: a method run without --data imports it (data_prep.py must then
sit beside common.py); with --data nothing here is needed.

Every ingesting command writes ROOT/manifest.csv (one row per id: status ok/missing/failed, reason, source file,
frame time and duration on the clip's clock, source sample rate, fps measured from the frame timestamps, audio
duration, start and silence filled in gaps, orientation applied, the settings), skips ids already done (same
settings, same source, frame and WAV still decodable) when re-run, removes the outputs of a clip that fails,
never replaces a broken clip by another one, writes each output atomically, and ends with a summary table naming
the ids of each failure or warning. Warnings (audio much shorter than the video, timestamp gaps, a silent track)
keep the clip 'ok'. A run that leaves no clip ready exits with an error.
Run `python data_prep.py SUBCOMMAND --help` for details.
"""
import argparse
import bisect
import csv
import json
import math
import os
import sys
import shutil
import time
import wave
import xml.etree.ElementTree as ET
from collections import deque
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

import common as C

VIDEO_EXT = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ts", ".m2ts", ".mts",
             ".ogv", ".wmv", ".asf"}
IMAGE_EXT = {".jpg", ".jpeg", ".png"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus"}
MANIFEST_FIELDS = ["id", "status", "reason", "source", "frame_time", "duration", "src_sr", "fps", "audio_duration",
                   "audio_start", "audio_filled", "orientation", "settings"]
SHORT_AUDIO = 0.8    # audio shorter than this fraction of the video (and by more than 0.5 s) is reported
SLACK = 0.005        # an audio frame within 5 ms of where the previous one ended follows it (timestamp rounding)
REORDER = 16         # frames decoded past the target before the frame search stops (H.264 reorders at most 16)
SILENT = 1e-3        # an audio track whose peak stays below this (-60 dBFS) is reported as silent
FLICKR_MISSING = "3908875357"   # in the original 250-image test list, absent from the released data


# ----------------------------------------------------------------------------------------------------------
# Decoding with PyAV
# ----------------------------------------------------------------------------------------------------------
class ClipError(Exception):
    """A broken clip: recorded in the manifest with its reason, then skipped."""
    status = "failed"


class Missing(ClipError):
    status = "missing"


def write_wav(path, x: np.ndarray, sr: int):
    """Mono PCM16 (clipped to [-1, 1]), written atomically."""
    path = Path(path)
    pcm = (np.clip(np.asarray(x, np.float64), -1, 1) * 32767).round().astype("<i2")
    tmp = path.with_name(path.name + ".part")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(sr)
        f.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def open_media(path):
    import av
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise ClipError(f"cannot open ({type(e).__name__}: {e})") from None


def decode_audio(path, sr: int, t0: float | None = None) -> dict:
    """The first audio stream of a file, down-mixed to mono by FFmpeg, each decoded frame placed at its timestamp
    on the clip's clock (sample 0 = t0, the container start; None: the file's own start): silence before a late
    start and in timestamp gaps (damaged or missing packets); a frame within SLACK of where the previous one ended
    follows it. The placed track is then resampled to sr in one piece.
    -> dict(x: float32 at sr, src_sr, start: s before the first sample, filled: s of silence put in gaps,
    overlap: s overwritten by frames that start before the previous one ended, bad: undecodable packets)."""
    import av
    with open_media(path) as c:
        if not c.streams.audio:
            raise ClipError("no audio stream")
        st = c.streams.audio[0]
        src_sr = st.codec_context.sample_rate
        if not src_sr:
            raise ClipError("the audio stream has no sample rate")
        if t0 is None:
            t0 = c.start_time / 1e6 if c.start_time is not None else 0.0
        mono = av.AudioResampler(format="s16", layout="mono", rate=src_sr)    # s16: FFmpeg's mix keeps the level
        pieces, pos, filled, overlap, bad = [], 0, 0, 0, 0
        for packet in c.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                bad += 1
                continue
            for frame in frames:
                y = np.concatenate([f.to_ndarray().reshape(-1) for f in mono.resample(frame)] + [np.zeros(0, "i2")])
                y = y.astype(np.float32) / 32768
                i = pos if frame.pts is None else round((frame.time - t0) * src_sr)
                if pieces and abs(i - pos) <= SLACK * src_sr:
                    i = pos
                elif pieces:
                    filled, overlap = filled + max(0, i - pos), overlap + max(0, pos - i)
                pieces.append((max(i, 0), y[max(-i, 0):]))
                pos = i + len(y)
    if not any(len(y) for _, y in pieces):
        raise ClipError(f"no decodable audio ({bad} undecodable packets)" if bad else "zero-length audio")
    x = np.zeros(max(i + len(y) for i, y in pieces), np.float32)
    for i, y in pieces:
        x[i:i + len(y)] = y
    if src_sr != sr:
        frame = av.AudioFrame.from_ndarray(x[None], format="flt", layout="mono")
        frame.sample_rate = src_sr
        res = av.AudioResampler(format="flt", layout="mono", rate=sr)
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in res.resample(frame) + res.resample(None)])
    return dict(x=x, src_sr=src_sr, start=pieces[0][0] / src_sr, filled=filled / src_sr, overlap=overlap / src_sr,
                bad=bad)


def audio_notes(a: dict, sr: int, duration: float | None = None) -> list[str]:
    """Warnings for the manifest's reason column (the clip stays 'ok')."""
    notes, n = [], len(a["x"]) / sr
    if duration and n < SHORT_AUDIO * duration and duration - n > 0.5:
        notes.append(f"warning: audio much shorter than the video ({n:.2f} s of {duration:.2f} s)")
    gaps = [f"{a['filled']:.3f} s filled with silence"] * (a["filled"] > 0) + \
        [f"{a['overlap']:.3f} s overlapped"] * (a["overlap"] > 0) + [f"{a['bad']} undecodable packets"] * (a["bad"] > 0)
    if gaps:
        notes.append(f"warning: audio timestamps have gaps ({', '.join(gaps)})")
    if np.abs(a["x"]).max() < SILENT:
        notes.append("warning: the audio track is silent (peak below -60 dBFS)")
    return notes


def frame_at(path, target: float, shift: float):
    """The video frame a player shows at time `target` (s, container clock) -> (upright PIL image, its time,
    the orientation column).

    Decoders emit frames in display order, but the timestamps FFmpeg attaches to them can be in decode order (an
    AVI stores none; with B-frames they come as 80, 82, 81, 83), so the frames decoded from the key frame before
    the target take that run's timestamps sorted, plus `shift` (the stream's start minus its first packet
    timestamp: non-zero only where FFmpeg guesses timestamps a frame late, as for an AVI with B-frames). The frame
    is the last one whose time is <= target (the first one when the target comes before it), shown as the
    stream's display matrix says (upright())."""
    import av
    for seek in (target - shift - 1.0, None):    # None: from the start, when a seek lands past the target
        with open_media(path) as c:
            vs = c.streams.video[0]
            try:
                if seek is not None:
                    c.seek(max(0, int(seek / vs.time_base)), stream=vs, backward=True)
            except av.error.FFmpegError:
                continue                                 # cannot seek: decode from the start
            times, last, past = [], deque(maxlen=REORDER + 2), 0
            try:
                for f in c.decode(vs):
                    if f.pts is not None:
                        times.append(f.time + shift)
                        last.append(f)
                        past += times[-1] > target
                        if past > REORDER:
                            break
            except av.error.FFmpegError as e:
                if not times:
                    raise ClipError(f"video decoding failed ({e})") from None
            if times and (min(times) <= target or seek is None):
                break
    if not times:
        raise ClipError("no decodable video frame")
    times.sort()
    k = max(0, bisect.bisect_right(times, target + 1e-6) - 1)
    frame = last[k - len(times) + len(last)]
    return *upright(frame), times[k]


def upright(frame):
    """A decoded frame as a player shows it -> (PIL image, orientation column). The display matrix [a b u c d v x y
    w] maps a pixel (p, q) (column, row) to (a p + c q, b p + d q): quarter turns and mirrors, by the signs of a, b,
    c, d (FFmpeg's frame.rotation reads a mirror as a turn: a horizontal one as 180 degrees, a vertical one as 0)."""
    import av
    img = frame.to_ndarray(format="rgb24")
    sds = frame.side_data          # iterating it gives the SideData, or (seen once in a full test run) their Type keys
    sds = [sd if hasattr(sd, "type") else sds[sd] for sd in sds]
    dm = [sd for sd in sds if sd.type == av.sidedata.sidedata.Type.DISPLAYMATRIX]
    a, b, _, c, d = np.sign(np.frombuffer(bytes(dm[0]), np.int32)[:5]).tolist() if dm else (1, 0, 0, 0, 1)
    if (a, b, c, d) == (1, 0, 0, 1):
        return Image.fromarray(img), ""
    if abs(a * d - b * c) != 1:                          # not axis-aligned (or degenerate)
        raise ClipError(f"display rotation {frame.rotation} degrees is not a multiple of 90")
    q, p = np.indices(img.shape[:2])
    p2, q2 = a * p + c * q, b * p + d * q
    out = np.empty((q2.max() - q2.min() + 1, p2.max() - p2.min() + 1, 3), np.uint8)
    out[q2 - q2.min(), p2 - p2.min()] = img[q, p]
    return Image.fromarray(out), (f"display rotation {frame.rotation:g}" if a * d - b * c > 0 else
                                  f"display matrix [{a} {b} {c} {d}] (mirrored)")


def video_clip(row: dict, src, sr: int, when: str):
    """One video -> (upright frame, audio at sr); fills the row's columns."""
    with open_media(src) as c:
        if not c.streams.video:
            raise ClipError("no video stream")
        if not c.streams.audio:
            raise ClipError("no audio stream")
        vs = c.streams.video[0]
        t0 = c.start_time / 1e6 if c.start_time is not None else 0.0       # the clip's clock starts here
        header = c.duration / 1e6 if c.duration else 0.0
        start = float(vs.start_time * vs.time_base) if vs.start_time is not None else None
        pts, end = [], 0.0
        for p in c.demux(vs):
            if p.pts is not None and p.size and not p.is_discard:       # discarded: before an MP4 edit list
                pts.append(float(p.pts * p.time_base))
                end = max(end, pts[-1] + float((p.duration or 0) * p.time_base))
    if not pts:
        raise ClipError("no video frames")
    pts.sort()
    a = decode_audio(src, sr, t0)
    streams = max(end - t0, len(a["x"]) / sr)          # the streams' length on the clip's clock
    # no duration in the header (browser WebM): the streams'; a header duration nearer their end time than their length
    # is an end time (FFmpeg's Matroska whose streams start late: start 5 s, 4.5 s long -> duration 9.5)
    dur = min((header, header - t0), key=lambda d: abs(d - streams)) if header else streams
    row["duration"] = f"{dur:.3f}"
    if dur <= 0:
        raise ClipError("zero length")
    t = dur / 2 if when == "middle" else float(when)
    if t > dur:
        raise ClipError(f"shorter ({dur:.2f} s) than the requested frame time {t:.2f} s")
    img, orientation, ft = frame_at(src, t0 + t, start - pts[0] if start is not None else 0.0)
    fps = (len(pts) - 1) / (pts[-1] - pts[0]) if len(pts) > 1 and pts[-1] > pts[0] else float(vs.average_rate or 0)
    row.update(frame_time=f"{ft - t0:.3f}", fps=f"{fps:.3f}", orientation=orientation,
               **audio_columns(a, sr), reason="; ".join(audio_notes(a, sr, dur)))
    return img, a["x"], sr


def audio_columns(a: dict, sr: int) -> dict:
    return dict(src_sr=str(a["src_sr"]), audio_duration=f"{len(a['x']) / sr:.3f}", audio_start=f"{a['start']:.3f}",
                audio_filled=f"{a['filled']:.3f}")


def load_frame(path, upright: bool):
    """An image file as RGB -> (image, orientation column). upright: turned as its EXIF orientation says (as
    viewers show it); otherwise the stored pixels (as the official Flickr-SoundNet loaders read them)."""
    try:
        with Image.open(path) as im:
            o = im.getexif().get(0x0112, 1)
            img = (ImageOps.exif_transpose(im) if upright else im).convert("RGB")
    except Exception as e:
        raise ClipError(f"cannot decode image ({e})") from None
    return img, "" if o == 1 else f"EXIF orientation {o}" + ("" if upright else " ignored (as the official loaders)")


def pair_clip(row: dict, img_path, aud_path, sr: int, upright: bool):
    """Already-extracted frame + audio file -> (frame, audio at sr); fills the row's columns."""
    if img_path is None or aud_path is None:
        raise Missing("no frame" if img_path is None else "no audio")
    img, row["orientation"] = load_frame(img_path, upright)
    a = decode_audio(aud_path, sr)
    row.update(duration=f"{len(a['x']) / sr:.3f}", **audio_columns(a, sr), reason="; ".join(audio_notes(a, sr)))
    return img, a["x"], sr


def save_jpeg(img, path):
    tmp = Path(str(path) + ".part")
    img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def bad_id(vid: str) -> bool:
    """Split files hold one id per line, cut at the first comma and stripped (common.read_split)."""
    return "," in vid or vid != vid.strip() or not vid.isprintable()


def make_clip(row: dict, out, make) -> dict:
    """Run make(row) -> (frame, audio, sr) and write frames/<id>.jpg + audio/<id>.wav; returns the manifest row
    (never raises). A clip that fails loses the outputs of an earlier run, so that nothing stale counts as
    present."""
    frame, wav = Path(out) / "frames" / f"{row['id']}.jpg", Path(out) / "audio" / f"{row['id']}.wav"
    try:
        if bad_id(row["id"]):
            raise ClipError("the file name cannot be an id (it has a comma, a control character or a space at "
                            "either end, which split files cannot hold): rename the file")
        img, x, sr = make(row)
        save_jpeg(img, frame)
        write_wav(wav, x, sr)
        row["status"] = "ok"
    except ClipError as e:
        row["status"], row["reason"] = e.status, str(e)
    except Exception as e:  # anything unexpected in a broken file is recorded, the run goes on
        row["status"], row["reason"] = "failed", f"{type(e).__name__}: {e}"
    if row["status"] != "ok":
        frame.unlink(missing_ok=True)
        wav.unlink(missing_ok=True)
    return row


def new_row(vid: str, source: str, settings: str) -> dict:
    return {**dict.fromkeys(MANIFEST_FIELDS, ""), "id": vid, "status": "failed", "source": source,
            "settings": settings}


def process_video(job):
    vid, src, out, sr, when = job
    return make_clip(new_row(vid, str(src), settings_key(sr, when)), out, lambda row: video_clip(row, src, sr, when))


def process_pair(job):
    vid, img, aud, out, sr, upright = job
    row = new_row(vid, pair_source(img, aud), settings_key(sr))
    return make_clip(row, out, lambda row: pair_clip(row, img, aud, sr, upright))


def pair_source(img, aud) -> str:
    return " + ".join(str(p) for p in (img, aud) if p)


# ----------------------------------------------------------------------------------------------------------
# Manifest, resume, parallel runs
# ----------------------------------------------------------------------------------------------------------
def read_manifest(root) -> dict:
    p = Path(root) / "manifest.csv"
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def write_manifest(root, rows: dict):
    p = Path(root) / "manifest.csv"
    tmp = Path(str(p) + ".part")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
    os.replace(tmp, p)


def settings_key(sr: int, when=None) -> str:
    """The settings a clip is made with, recorded in the manifest: a re-run with others makes the clip again."""
    return f"sr={sr}" + (f";time={when}" if when is not None else "")


def pmap(fn, jobs: list, workers: int, desc: str, chunksize: int = 1):
    """fn over the jobs (in `workers` processes when > 1) with a progress bar; yields results as they finish."""
    if not jobs:
        return
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            yield from C.progress(pool.imap_unordered(fn, jobs, chunksize), desc, total=len(jobs))
    else:
        yield from C.progress(map(fn, jobs), desc, total=len(jobs))


def to_make(root, sources: dict, manifest: dict, settings: str, workers: int) -> list:
    """The ids (of id -> source) to make: all but those 'ok' in the manifest, made with the same settings from
    the same source, whose frame and WAV still decode (nothing that `check` flags is kept as done)."""
    same = [v for v, s in sources.items() if manifest.get(v, {}).get("status") == "ok"
            and manifest[v].get("settings") == settings and manifest[v].get("source") == s]
    jobs = [(str(root), v, None, ()) for v in same]
    done = {v for v, problems, _ in pmap(clip_problems, jobs, workers, "verify", 16) if not problems}
    return [v for v in sources if v not in done]


def run_jobs(fn, jobs, root, workers: int, manifest: dict):
    """Run the jobs (in parallel with --workers), appending each row to the manifest as it completes (so an
    interrupted run keeps what it finished), then print the summary table."""
    if jobs:
        write_manifest(root, manifest)                  # (re)written with the current columns before appending
        with open(Path(root) / "manifest.csv", "a", newline="") as f:
            w = csv.DictWriter(f, MANIFEST_FIELDS)
            for row in pmap(fn, jobs, workers, "clips"):
                manifest[row["id"]] = row
                w.writerow(row)
                f.flush()
    write_manifest(root, manifest)
    summary(manifest)


def summary(manifest: dict, show: int = 5):
    """Counts by status and reason (up to the first ' ('), naming the ids of every group but the plain 'ok'."""
    groups = {}
    for k in sorted(manifest):
        r = manifest[k]
        groups.setdefault((r["status"], (r.get("reason") or "").split(" (")[0]), []).append(k)
    print(f"{'status':<8} {'count':>7}  reason")
    for (status, reason), ids in sorted(groups.items(), key=lambda kv: (kv[0][0] != "ok", -len(kv[1]))):
        more = f" and {len(ids) - show} more" if len(ids) > show else ""
        print(f"{status:<8} {len(ids):>7}  {reason}" + (f": {', '.join(ids[:show])}{more}" if reason else ""))
    print(f"{'total':<8} {len(manifest):>7}")


def prepare_root(out):
    out = Path(out)
    for d in ("frames", "audio", "splits"):
        (out / d).mkdir(parents=True, exist_ok=True)
    return out


def files_by_stem(src, exts) -> dict:
    """id (file name without extension) -> file, under src at any depth. Two files with one id are refused in one
    line that names them (the id must say which file a frame and a WAV come from)."""
    found = {}
    for p in sorted(Path(src).rglob("*")):
        if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p.resolve())
    clash = [f"{k}: {', '.join(map(str, v))}" for k, v in found.items() if len(v) > 1]
    if clash:
        raise C.UserError(f"{len(clash)} ids name more than one file under {src} (an id is the file name without "
                          f"its extension; rename or move the extra files): {'; '.join(clash[:3])}"
                          f"{' ...' if len(clash) > 3 else ''}")
    return {k: v[0] for k, v in found.items()}


# ----------------------------------------------------------------------------------------------------------
# The synthetic benchmark (`synth`; every method imports it from here when run without --data)
# ----------------------------------------------------------------------------------------------------------
# Each class has a look (colour, shape, texture) and a sound (fundamental, timbre = harmonic amplitudes,
# rhythm = pulse rate). Frames show the sounding object plus silent objects of other classes of the same size
# distribution on a cluttered grey background, so only the sound says which object to localise.
SYNTH_CLASSES = [  # name, RGB, shape, texture, f0 (Hz), harmonic amplitudes, pulses per second
    ("red_disc", (215, 45, 45), "disc", "plain", 300.0, (1.0, 0.5, 0.25, 0.12), 2.0),
    ("green_square", (45, 180, 60), "square", "stripes", 450.0, (1.0, 0.0, 0.6, 0.0), 3.0),
    ("blue_triangle", (50, 85, 225), "triangle", "dots", 675.0, (1.0, 0.8, 0.0, 0.4), 4.5),
    ("yellow_diamond", (230, 205, 40), "diamond", "plain", 1010.0, (1.0, 0.2, 0.2, 0.2), 6.0),
    ("magenta_cross", (205, 50, 195), "cross", "stripes", 1520.0, (1.0, 0.6, 0.0, 0.0), 1.5),
    ("cyan_ring", (40, 195, 205), "ring", "dots", 2280.0, (1.0, 0.0, 0.0, 0.3), 8.0),
    ("orange_disc", (240, 140, 30), "disc", "stripes", 370.0, (1.0, 0.9, 0.7, 0.5), 5.0),
    ("purple_square", (120, 50, 170), "square", "dots", 820.0, (1.0, 0.3, 0.6, 0.1), 2.5),
]
SYNTH_DEFAULTS = dict(seed=0, n_classes=6, image_size=128, seconds=3.0, sr=16000,
                      sizes=dict(train=1200, val=150, test=300, cocktail_train=800, cocktail_val=100, cocktail_test=200,
                                 interactive_test=150))
# Styles: independent choices of how a world looks and sounds (the first of each is the default world). A method
# tuned on the default world is checked on the others: it has to localise the sound, not this generator's habits.
SYNTH_STYLES = dict(background=("grey", "texture"), objects=("large", "small", "mixed"), sound=("tone", "chirp", "noise"))
OBJECT_SIDES = dict(large=(0.48, 0.62), small=(0.16, 0.3), mixed=(0.2, 0.6))   # side / frame side (single source)


def default_synth_root() -> Path:
    """Where methods look for (and generate) the synthetic benchmark: $AVSL_SYNTH or data/synth beside this file
    (data_prep.py sits beside common.py and the method files)."""
    return Path(os.environ.get("AVSL_SYNTH", Path(__file__).resolve().parent / "data" / "synth"))


def _class_sound(rng, c: int, n: int, sr: int, family: str = "tone") -> np.ndarray:
    """Class c's sound, pulsed at its rate: 'tone' its harmonics of f0; 'chirp' a sweep f0 -> 1.6 f0 once per pulse;
    'noise' white noise band-passed to [0.8 f0, 1.25 f0] (no pitch, no harmonics)."""
    _, _, _, _, f0, amps, rate = SYNTH_CLASSES[c]
    t = np.arange(n) / sr
    f0 = f0 * (1 + rng.uniform(-0.02, 0.02))
    if family == "tone":
        x = sum(a * np.sin(2 * np.pi * (h + 1) * f0 * t + rng.uniform(0, 2 * np.pi)) for h, a in enumerate(amps) if a)
    phase = rng.uniform(0, 2 * np.pi)
    env = 0.15 + 0.85 / (1 + np.exp(-8 * np.sin(2 * np.pi * rate * t + phase)))
    if family == "tone":
        return x * env / sum(amps)
    if family == "chirp":
        u = (rate * t + phase / (2 * np.pi)) % 1.0                     # position within the sweep
        return np.sin(2 * np.pi * np.cumsum(f0 * (1 + 0.6 * u)) / sr) * env
    spec = np.fft.rfft(rng.normal(0, 1, n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < 0.8 * f0) | (f > 1.25 * f0)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9) * env


def synth_audio(rng, classes, n: int, sr: int, family: str = "tone") -> np.ndarray:
    """The mixture of the given classes' sounds plus white background noise, peak-normalised to 0.7."""
    x = sum(_class_sound(rng, c, n, sr, family) for c in classes) + rng.normal(0, rng.uniform(0.05, 0.2), n)
    return 0.7 * x / np.abs(x).max()


def _textured(rng, size: int) -> Image.Image:
    """The 'texture' background: coloured low-frequency noise under two random colour gratings and coloured
    clutter (colours drawn freely, so a class's colour can appear in the background)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    low = rng.normal(0, 1, (3, 5, 5))
    base = np.stack([np.asarray(Image.fromarray(((ch - ch.min()) / (np.ptp(ch) + 1e-9) * 255).astype(np.uint8))
                                .resize((size, size), Image.BICUBIC), np.float64) for ch in low], -1)
    arr = 0.5 * base + rng.uniform(40, 140, 3)
    for _ in range(2):
        k, th = rng.uniform(4, 16), rng.uniform(0, np.pi)
        g = np.sin(2 * np.pi * k * (xx * np.cos(th) + yy * np.sin(th)))[..., None]
        arr += 0.5 * g * rng.uniform(-60, 60, 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 13)):
        s = rng.uniform(0.04, 0.14) * size
        x, y = rng.uniform(-s / 2, size - s / 2, 2)
        fill = tuple(int(v) for v in rng.integers(30, 226, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], fill=fill)
    return img


def _background(rng, size: int, kind: str = "grey") -> Image.Image:
    if kind == "texture":
        return _textured(rng, size)
    low = rng.normal(0, 1, (6, 6))
    low = np.asarray(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-9) * 255).astype(np.uint8))
                     .resize((size, size), Image.BICUBIC), np.float64)
    base = rng.uniform(90, 170) + (low - 127) * 0.25
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGB")
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 13)):  # grey clutter
        s = rng.uniform(0.06, 0.18) * size
        x, y = rng.uniform(-s / 2, size - s / 2, 2)
        g = int(rng.uniform(50, 210))
        fill = tuple(int(np.clip(g + rng.integers(-8, 9), 0, 255)) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], fill=fill)
    return img


def _draw_object(img: Image.Image, rng, c: int, box) -> np.ndarray:
    """Draw class c filling the integer pixel box [x1, y1, x2, y2) (the shape touches all four sides).
    Returns the boolean mask of the drawn pixels."""
    _, rgb, shape, texture, *_ = SYNTH_CLASSES[c]
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    m = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(m)
    r = [x1, y1, x2 - 1, y2 - 1]
    if shape == "disc":
        d.ellipse(r, fill=255)
    elif shape == "square":
        d.rectangle(r, fill=255)
    elif shape == "triangle":
        d.polygon([(x1 + (w - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=255)
    elif shape == "diamond":
        d.polygon([(x1 + (w - 1) / 2, y1), (x2 - 1, y1 + (h - 1) / 2), (x1 + (w - 1) / 2, y2 - 1), (x1, y1 + (h - 1) / 2)],
                  fill=255)
    elif shape == "cross":
        d.rectangle([x1 + w // 3, y1, x2 - 1 - w // 3, y2 - 1], fill=255)
        d.rectangle([x1, y1 + h // 3, x2 - 1, y2 - 1 - h // 3], fill=255)
    elif shape == "ring":
        d.ellipse(r, fill=255)
        t = max(2, int(0.22 * min(w, h)))
        d.ellipse([x1 + t, y1 + t, x2 - 1 - t, y2 - 1 - t], fill=0)
    mask = np.asarray(m) > 0
    col = np.clip(np.array(rgb) + rng.integers(-12, 13, 3), 0, 255).astype(np.float64)
    tex = np.ones(img.size[::-1])
    yy, xx = np.mgrid[0:img.size[1], 0:img.size[0]]
    if texture == "stripes":
        tex[((xx + yy) // 3) % 3 == 0] = 0.78
    elif texture == "dots":
        tex[((xx % 6) < 2) & ((yy % 6) < 2)] = 0.78
    arr = np.asarray(img, np.float64).copy()
    arr[mask] = col * tex[mask][:, None]
    img.paste(Image.fromarray(arr.astype(np.uint8)))
    return mask


def _place(rng, size, sides, tries=200, max_overlap=0.2):
    """Random non-overlapping (up to max_overlap of the smaller box) integer boxes of the given side lengths."""
    boxes = []
    for s in sides:
        s = int(round(s * size))
        for _ in range(tries):
            x, y = rng.integers(0, size - s + 1, 2)
            b = (int(x), int(y), int(x) + s, int(y) + s)
            ok = all(max(0, min(b[2], o[2]) - max(b[0], o[0])) * max(0, min(b[3], o[3]) - max(b[1], o[1]))
                     <= max_overlap * min(s, o[2] - o[0]) ** 2 for o in boxes)
            if ok:
                boxes.append(b)
                break
    return boxes


def render_single(rng, n_classes: int, size: int, background: str = "grey", objects: str = "large"):
    """One single-source scene: (PIL image, sounding class, its normalised box, objects list, sounding mask)."""
    img = _background(rng, size, background)
    c = int(rng.integers(n_classes))
    others = [int(o) for o in rng.permutation([k for k in range(n_classes) if k != c])[:rng.choice([1, 2], p=[0.6, 0.4])]]
    boxes = _place(rng, size, rng.uniform(*OBJECT_SIDES[objects], 1 + len(others)))
    others = others[:len(boxes) - 1]                # a distractor that does not fit is left out
    objects = []
    for k, b in zip(others, boxes[1:]):            # silent ones first; the sounding object is drawn on top
        _draw_object(img, rng, k, b)
        objects.append((k, b, False))
    mask = _draw_object(img, rng, c, boxes[0])
    objects.append((c, boxes[0], True))
    return img, c, objects, mask


def render_cocktail(rng, n_classes: int, size: int, background: str = "grey"):
    """A 2x2 grid of four single-object tiles of distinct classes; two of them sound."""
    tile = size // 2
    img = Image.new("RGB", (size, size))
    classes = [int(k) for k in rng.permutation(n_classes)[:4]]
    sounding = set(int(i) for i in rng.permutation(4)[:2])
    objects = []
    for q, k in enumerate(classes):
        t = _background(rng, tile, background)
        s = int(round(rng.uniform(0.6, 0.85) * tile))
        x, y = (int(v) for v in rng.integers(0, tile - s + 1, 2))
        _draw_object(t, rng, k, (x, y, x + s, y + s))
        ox, oy = (q % 2) * tile, (q // 2) * tile
        img.paste(t, (ox, oy))
        objects.append((k, (ox + x, oy + y, ox + x + s, oy + y + s), q in sounding))
    return img, objects


def render_pair(rng, n_classes: int, size: int, background: str = "grey", objects: str = "large"):
    """An IS3-style scene: two objects of distinct classes (sides from the style's range, at most half the frame;
    overlapping by at most a fifth of the smaller) and no third. -> (PIL image, [(class, box), (class, box)])."""
    img, classes, boxes = _background(rng, size, background), [int(k) for k in rng.permutation(n_classes)[:2]], []
    lo, hi = OBJECT_SIDES[objects]
    while len(boxes) < 2:
        boxes = _place(rng, size, rng.uniform(lo, min(hi, 0.5), 2))
    for k, b in zip(classes, boxes):
        _draw_object(img, rng, k, b)
    return img, list(zip(classes, boxes))


def make_synthetic(root, seed: int = 0, n_classes: int = 6, image_size: int = 128, seconds: float = 3.0,
                   sr: int = 16000, sizes: dict | None = None, log=print, background: str = "grey",
                   objects: str = "large", sound: str = "tone") -> Path:
    """Write the synthetic benchmark in the standard layout (deterministic by seed; one rng per clip).

    Splits: train/val/test (single source: the sounding object plus 1-2 silent ones), cocktail_train/val/test
    (2x2 grids, two sounding + two silent tiles, audio mixed), interactive_test (IS3-style: two objects a frame, the
    frame listed twice, <split>_<i>_<j> with object j's sound alone, "group" <split>_<i>: protocol is3's IIoU).
    annotations.json covers every id (the methods read boxes only for val/test; CSOL's evaluation reads the classes
    of the clustered items).
    """
    if not 4 <= n_classes <= len(SYNTH_CLASSES):
        raise C.UserError(f"n_classes must be between 4 and {len(SYNTH_CLASSES)}")
    for k, v in dict(background=background, objects=objects, sound=sound).items():
        if v not in SYNTH_STYLES[k]:
            raise C.UserError(f"{k} {v!r}: choose one of {', '.join(SYNTH_STYLES[k])}")
    sizes = dict(SYNTH_DEFAULTS["sizes"] if sizes is None else sizes)
    root = Path(root)
    for d in ("frames", "audio", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in SYNTH_CLASSES[:n_classes]]
    n = int(round(seconds * sr))
    ann, t0 = [], time.time()
    norm = lambda b: [round(v / image_size, 6) for v in b]  # noqa: E731
    for si, (split, count) in enumerate(sizes.items()):
        ids = []
        for i in range(count):
            vid = f"{split}_{i:05d}"
            rng = np.random.default_rng([seed, si, i])
            if split.startswith("interactive"):
                img, pair = render_pair(rng, n_classes, image_size, background, objects)
                for j, (c, b) in enumerate(pair):      # the same frame, once with each object's sound
                    img.save(root / "frames" / f"{vid}_{j}.jpg.part", format="JPEG", quality=95)
                    os.replace(root / "frames" / f"{vid}_{j}.jpg.part", root / "frames" / f"{vid}_{j}.jpg")
                    write_wav(root / "audio" / f"{vid}_{j}.wav", synth_audio(rng, [c], n, sr, sound), sr)
                    ann.append({"file": f"{vid}_{j}", "class": names[c], "bbox": [norm(b)], "group": vid, "objects": [
                        {"class": names[k], "bbox": norm(o), "sounding": k == c} for k, o in pair]})
                    ids.append(f"{vid}_{j}")
                continue
            if split.startswith("cocktail"):
                img, objs = render_cocktail(rng, n_classes, image_size, background)
                snd = [k for k, _, s in objs if s]
                audio = synth_audio(rng, snd, n, sr, sound)
                entry_class = "+".join(names[k] for k in snd)
            else:
                img, c, objs, _ = render_single(rng, n_classes, image_size, background, objects)
                audio = synth_audio(rng, [c], n, sr, sound)
                entry_class = names[c]
            tmp = root / "frames" / f"{vid}.jpg.part"
            img.save(tmp, format="JPEG", quality=95)
            os.replace(tmp, root / "frames" / f"{vid}.jpg")
            write_wav(root / "audio" / f"{vid}.wav", audio, sr)
            ann.append({"file": vid, "class": entry_class, "bbox": [norm(b) for _, b, s in objs if s],
                        "objects": [{"class": names[k], "bbox": norm(b), "sounding": bool(s)} for k, b, s in objs]})
            ids.append(vid)
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        log(f"  synthetic {split}: {len(ids)} clips")
    C.write_json(root / "annotations.json", ann)
    meta = dict(seed=seed, n_classes=n_classes, image_size=image_size, seconds=seconds, sr=sr, sizes=sizes,
                classes=names, background=background, objects=objects, sound=sound)
    C.write_json(root / "synth.json", meta)
    log(f"  synthetic benchmark written to {root} in {time.time() - t0:.1f}s")
    return root


def ensure_synthetic(root=None, log=print, **kw) -> Path:
    """Generate the synthetic benchmark once (announced on the console); reuse it when its synth.json matches."""
    root = Path(root) if root else default_synth_root()
    want = {**SYNTH_DEFAULTS, **kw}
    meta_path = root / "synth.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return root
        log(f"synthetic benchmark at {root} was made with other settings; regenerating")
    log(f"no --data given: generating the built-in synthetic benchmark at {root} (once; about a minute)")
    return make_synthetic(root, log=log, **want)


# ----------------------------------------------------------------------------------------------------------
# A method's heat map over a video, with its sound (`--predict --video`; common.predict_video imports this)
# ----------------------------------------------------------------------------------------------------------
PANEL = 640          # a heat-map video's panels: the upright frame scaled to at most 640 px on its longer side


class Damaged(Exception):
    """The video stream stops decoding part way: the frames before it are good."""


def moving_clip(path, seed: int = 0, n_classes: int = 6, size: int = 128, seconds: float = 3.0, fps: int = 10,
                sr: int = 16000, width: int | None = None) -> dict:
    """A video in the synthetic benchmark's world (its backgrounds, objects and sounds), `width` (default: size) x
    `size` px: an object of one class sounds while it crosses the upper half from left to right; a silent one of
    another class crosses the lower half the other way. H.264 (crf 12) + 16-bit PCM (an .mkv or .mov path).
    -> dict(classes: (sounding, silent), boxes: (T, 2, 4) pixel boxes [x1, y1, x2, y2] of the sounding and the silent
    object per frame, times (s), audio, sr)."""
    import av
    from fractions import Fraction
    rng, W = np.random.default_rng([seed, 99]), width or size
    bg = _background(rng, max(W, size)).crop((0, 0, W, size))
    c, d = (int(k) for k in rng.permutation(n_classes)[:2])
    s, T = int(round(0.48 * size)), int(round(seconds * fps))
    audio, boxes = synth_audio(rng, [c], int(round(seconds * sr)), sr), []
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps, options={"crf": "12"})
        vs.width, vs.height, vs.pix_fmt = W, size, "yuv420p"
        st = out.add_stream("pcm_s16le", rate=sr, layout="mono")
        for k in range(T):
            x = int(round((W - s) * k / max(T - 1, 1)))
            boxes.append([(x, 1, x + s, 1 + s), (W - s - x, size - 1 - s, W - x, size - 1)])
            img = bg.copy()
            _draw_object(img, np.random.default_rng([seed, k]), d, boxes[-1][1])
            _draw_object(img, np.random.default_rng([seed, k]), c, boxes[-1][0])
            for p in vs.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                out.mux(p)
        fr = av.AudioFrame.from_ndarray((audio * 32767).round().astype("<i2")[None], format="s16", layout="mono")
        fr.sample_rate, fr.pts, fr.time_base = sr, 0, Fraction(1, sr)
        for p in [*vs.encode(), *st.encode(fr), *st.encode()]:
            out.mux(p)
    return dict(classes=(c, d), boxes=np.array(boxes), times=np.arange(T) / fps, audio=audio, sr=sr)


def _display_order(c, vs, t0: float):
    """(time on the clip's clock, frame) as decoded; the timestamps of every REORDER + 1 frames sorted (as in
    frame_at: they can come in decode order)."""
    import heapq
    buf, ts = deque(), []
    for f in c.decode(vs):
        if f.pts is not None:
            buf.append(f), heapq.heappush(ts, f.time - t0)
            if len(buf) > REORDER:
                yield heapq.heappop(ts), buf.popleft()
    while buf:
        yield heapq.heappop(ts), buf.popleft()


def shown_frames(src, times, t0: float):
    """(t, upright PIL frame) for each of the increasing `times` (s on the clip's clock; 0 = the container start t0):
    the frame a player shows at t, the last one whose timestamp is <= t (the first one before it), decoded once,
    in order. Damaged when decoding fails, or the frames stop over a second before the last time."""
    import av

    def pil(f):
        try:
            return upright(f)[0]
        except ClipError as e:                            # a display rotation that is not a quarter turn
            raise Damaged(str(e)) from None
    for seek in ((t0 + times[0] - 1.0) if times[0] > 1.0 else None, None):     # None: decode from the start
        with open_media(src) as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            k, prev, img, ft = 0, None, None, 0.0
            try:
                if seek is not None:
                    c.seek(int(seek / vs.time_base), stream=vs, backward=True)
                for ft, f in _display_order(c, vs, t0):
                    if seek is not None and prev is None and ft > times[0] + 1e-6:
                        break                                 # the seek landed past the first time
                    while k < len(times) and times[k] + 1e-6 < ft:
                        img = img or pil(prev or f)
                        yield times[k], img
                        k += 1
                    if k == len(times):
                        return
                    prev, img = f, None
            except av.error.FFmpegError as e:
                if seek is not None and prev is None:
                    continue
                raise Damaged(f"video decoding failed after {ft:.2f} s ({e})") from None
            if prev is None and seek is not None:
                continue
            for t in times[k:]:
                if prev is None or t > ft + 1.0:
                    raise Damaged(f"the video frames stop at {ft:.2f} s" if prev else "no decodable video frame")
                img = img or pil(prev)
                yield t, img
            return


def _video_info(src, need_audio: bool) -> tuple:
    """-> (t0: the container's start, end: the video stream's end on the clip's clock, the stream's frame rate,
    the duration the file states or None), from its packets (no decoding)."""
    import av
    with open_media(src) as c:
        if not c.streams.video:
            raise ClipError("no video stream")
        if need_audio and not c.streams.audio:
            raise ClipError("no audio track (give the sound with --audio WAV)")
        vs = c.streams.video[0]
        t0 = c.start_time / 1e6 if c.start_time is not None else 0.0
        try:
            ends = [float((p.pts + (p.duration or 0)) * p.time_base) for p in c.demux(vs) if p.pts is not None
                    and p.size]
        except av.error.FFmpegError as e:
            raise ClipError(f"unreadable ({e})") from None
        if not ends:
            raise ClipError("no video frames")
        return t0, max(ends) - t0, vs.average_rate or vs.guessed_rate, (c.duration / 1e6 if c.duration else None)


def _audio_out(src, t0, start: float, stop: float, rate: int, layout: str):
    """The audio track of [start, stop) s on the clip's clock (0 = t0; None: the file's own start) at `rate`,
    `layout`, placed by its timestamps as decode_audio does: (ch, n) float32 pieces, silence in gaps and past the
    track's end, so that they add up to exactly round(stop * rate) - round(start * rate) samples."""
    import av
    first, total, pos = round(start * rate), round(stop * rate) - round(start * rate), 0
    with open_media(src) as c:
        st = c.streams.audio[0]
        if t0 is None:
            t0 = c.start_time / 1e6 if c.start_time is not None else 0.0
        res = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        for packet in c.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            for frame in frames:
                y = np.concatenate([g.to_ndarray() for g in res.resample(frame)] + [np.zeros((len(
                    av.AudioLayout(layout).channels), 0), np.float32)], 1)
                i = pos if frame.pts is None else round((frame.time - t0) * rate) - first
                i = pos if abs(i - pos) <= SLACK * rate else i
                if i > pos:
                    yield np.zeros((len(y), min(i, total) - pos), np.float32)
                    pos = min(i, total)
                y = y[:, pos - i:total - i] if pos >= i else y[:, :0]
                if y.shape[1]:
                    yield y
                    pos += y.shape[1]
                if pos >= total:
                    return
    yield np.zeros((len(av.AudioLayout(layout).channels), total - pos), np.float32)


def predict_video(args, maps, transform: tuple, window: tuple, device, log=print) -> None:
    """`--predict --video CLIP --out OUT.mp4` for a method. maps(images (B, 3, S, S), waveforms (B, N)) -> (B, h, w):
    its --predict map, batched, on `device`; transform = (kind, size, interpolation): its test image transform
    (common.image_transform); window = (sr, seconds, where): its test audio window, here centred on each output
    frame's time (cut at the audio's ends and padded by common.clip_window's rule for `where`). Streams: frames are
    decoded, mapped in batches and encoded as they come (--norm video: a first pass keeps the raw maps on disk for
    the colour scale). Writes OUT (H.264, the frame | the map | their blend as the PNG overlays, the original sound
    as AAC) and --save-maps (npz: maps (T, h, w), times (T,) in s)."""
    import av
    import tempfile
    import torch
    from fractions import Fraction
    src, out, t_start = Path(args.video), Path(args.out or "heat.mp4"), time.time()
    if out.suffix.lower() != ".mp4":
        raise C.UserError(f"--out {out}: --video writes an MP4 video; name it *.mp4")
    if args.save_maps:
        C.check_file_writable(args.save_maps, "--save-maps")
    if args.start < 0:
        raise C.UserError(f"--start {args.start:g}: must be at least 0")
    for path in [src] + ([Path(args.audio)] if args.audio else []):
        if not path.is_file():
            raise C.BadMedia(path, None, "file not found")
    try:
        t0, end, rate, stated = _video_info(src, need_audio=not args.audio)
    except ClipError as e:
        raise C.BadMedia(src, None, str(e)) from None
    if stated and stated - end > 1.0:
        log(f"note: {src}: the video stream ends at {end:.2f} s, the file says {stated:.2f} s (truncated?)")
    if args.start >= end:
        raise C.UserError(f"{src}: --start {args.start:g} s is past the end of the video ({end:.2f} s)")
    stop = end if args.duration is None else args.start + args.duration
    if stop > end + 1e-6:
        log(f"note: the video ends at {end:.2f} s: the segment stops there")
    fps = Fraction(args.fps).limit_denominator(1001) if args.fps else min(Fraction(rate or 25), Fraction(25))
    K = max(1, int(round((min(stop, end) - args.start) * fps)))
    times = args.start + np.arange(K) / float(fps)

    asrc = Path(args.audio) if args.audio else src
    sr, seconds, where = window
    try:
        x = decode_audio(asrc, sr, None if args.audio else t0)["x"]
        with open_media(asrc) as c:
            st = c.streams.audio[0]
            arate, ach = st.codec_context.sample_rate, st.codec_context.channels
    except ClipError as e:
        raise C.BadMedia(asrc, None, str(e)) from None
    n = int(round(sr * seconds))
    if 4 * len(x) < n:
        raise C.BadMedia(asrc, None, f"audio too short: {len(x) / sr:.3f} s, the method needs {seconds:g} s")
    if len(x) < times[-1] * sr + 1:
        log(f"note: {asrc}: the audio ends at {len(x) / sr:.2f} s, before the video: silence after it")
        x = np.concatenate([x, np.zeros(int(times[-1] * sr) + 1 - len(x), np.float32)])
    arate = arate if arate in av.Codec("aac", "w").audio_rates else 48000
    layout = {1: "mono", 6: "5.1"}.get(ach, "stereo")               # others: mixed down to stereo

    tf, batch_size = C.image_transform(*transform), 16 if device.type == "cpu" else 64

    def wav(t):                       # the window centred on t, cut at the audio's ends, padded by the method's rule
        lo = int(round(t * sr)) - n // 2
        return C.clip_window(x[max(lo, 0):max(lo + n, 1)], sr, seconds, where)

    def mapped(frames):               # (t, frame) -> (t, frame, raw map), in batches on the device
        batch, err, frames = [], None, iter(frames)
        while True:
            try:
                item = next(frames, None)
            except Damaged as e:          # the frames before the damage are mapped first
                err, item = e, None
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == batch_size):
                with torch.no_grad():
                    m = maps(torch.stack([tf(im) for _, im in batch]).to(device),
                             torch.from_numpy(np.stack([wav(t) for t, _ in batch])).to(device)).float().cpu().numpy()
                yield from ((t, im, mm) for (t, im), mm in zip(batch, m))
                batch = []
            if item is None:
                break
        if err:
            raise err

    with tempfile.TemporaryDirectory() as tmp:
        store, scale, err = None, None, None

        def keep(k, m):
            nonlocal store
            if store is None:
                store = np.lib.format.open_memmap(Path(tmp) / "maps.npy", "w+", np.float32, (K, *m.shape))
            store[k] = m

        done = 0
        if args.norm == "video":                    # pass 1: the raw maps (on disk) and their range
            lo, hi = np.inf, -np.inf
            try:
                pass1 = C.progress(mapped(shown_frames(src, times, t0)), "mapping", K, unit="frame")
                for done, (_, _, m) in enumerate(pass1, 1):
                    keep(done - 1, m)
                    lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
            except Damaged as e:
                err, K = e, done
            scale = (lo, hi)
            frames = ((t, im, store[k]) for k, (t, im) in enumerate(shown_frames(src, times[:K], t0)))
        else:
            frames = ((t, im, keep(k, m) or m) if args.save_maps else (t, im, m)
                      for k, (t, im, m) in enumerate(mapped(shown_frames(src, times, t0))))
        part, done = out.with_name(out.name + ".part"), 0
        try:
            frames = C.progress(frames, "writing", K, unit="frame")
            done = K and _write_video(part, frames, fps, scale, transform[0] == "center_crop",
                                _audio_out(asrc, None if args.audio else t0, args.start, args.start + K / float(fps),
                                           arate, layout), arate, layout)
        except Damaged as e:
            err, done = e, e.args[1] if len(e.args) > 1 else 0
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if done:
            os.replace(part, out)
        else:
            part.unlink(missing_ok=True)
        if args.save_maps and done:
            with open(f"{args.save_maps}.part", "wb") as f:
                np.savez_compressed(f, maps=store[:done], times=times[:done])
            os.replace(f"{args.save_maps}.part", args.save_maps)
    if err:
        raise C.BadMedia(src, None, f"{err.args[0]}; " + (f"the first {done / float(fps):.2f} s were written to {out}"
                                                        if done else "nothing was written"))
    took = time.time() - t_start
    log(f"heat-map video written to {out}: {done} frames at {float(fps):g} fps from {args.start:g} s to "
        f"{args.start + done / float(fps):.2f} s, colours per {args.norm}, sound {layout} {arate} Hz AAC"
        + (f"; maps in {args.save_maps}" if args.save_maps else "") + f" ({took:.1f} s, {done / took:.1f} frames/s)")


def overlay(frame: np.ndarray, heat: np.ndarray, boxes=None, scale=None) -> Image.Image:
    """Three panels side by side: the frame (H, W, 3 uint8) with the normalised boxes in green, the heat map in the
    jet colours (min-max normalised, or mapped from scale = (lo, hi) to [0, 1]), and their blend."""
    import torch
    import torch.nn.functional as F
    h, w = frame.shape[:2]
    hm = F.interpolate(torch.as_tensor(np.asarray(heat, np.float64))[None, None], size=(h, w), mode="bilinear")[0, 0]
    hm = (C.minmax(hm) if scale is None else ((hm - scale[0]) / max(scale[1] - scale[0], 1e-12)).clamp(0, 1))
    hm = hm.numpy()[..., None]
    jet = (np.clip(np.concatenate([1.5 - np.abs(4 * hm - 3), 1.5 - np.abs(4 * hm - 2), 1.5 - np.abs(4 * hm - 1)], -1),
                   0, 1) * 255).astype(np.uint8)
    panels = [Image.fromarray(a.astype(np.uint8)) for a in (frame, jet, frame * 0.5 + jet * 0.5)]
    for img in (panels[0], panels[2]):
        d = ImageDraw.Draw(img)
        for b in boxes or []:
            x1, y1, x2, y2 = (max(v, 0.0) for v in b)
            d.rectangle([x1 * w, y1 * h, x2 * w - 1, y2 * h - 1], outline=(0, 255, 0), width=2)
    out = Image.new("RGB", (3 * w, h))
    for k, img in enumerate(panels):
        out.paste(img, (k * w, 0))
    return out


def save_overlay_png(path, frame: np.ndarray, heat: np.ndarray, boxes=None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    overlay(frame, heat, boxes).save(path)


def _write_video(path, frames, fps, scale, crop: bool, audio, arate: int, layout: str) -> int:
    """Encode (t, frame, map) items as H.264 frames drawn by overlay (panels of the upright frame, centre-
    cropped to a square for the `center_crop` test transform, at most PANEL px) with the audio pieces interleaved as
    AAC -> the number of frames written. A Damaged error from `frames` closes the file (playable) and is raised
    again with that number."""
    import av
    import itertools
    from fractions import Fraction
    it, done, pos, err = iter(frames), 0, 0, None
    try:
        first = next(it)
    except StopIteration:
        return 0
    except Damaged as e:
        raise Damaged(e.args[0], 0) from None
    w, h = (min(first[1].size),) * 2 if crop else first[1].size
    s = min(1.0, PANEL / max(w, h))
    W, H = max(2, 2 * round(w * s / 2)), max(2, 2 * round(h * s / 2))

    def panel(im):
        if crop:
            side = min(im.size)
            x, y = round((im.width - side) / 2), round((im.height - side) / 2)
            im = im.crop((x, y, x + side, y + side))
        return np.asarray(im if im.size == (W, H) else im.resize((W, H), Image.BILINEAR))

    with av.open(str(path), "w", format="mp4") as o:
        vs = o.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = 3 * W, H, "yuv420p"
        st = o.add_stream("aac", rate=arate, layout=layout)

        def audio_until(n):
            nonlocal pos
            while pos < n and (y := next(audio, None)) is not None:
                if y.shape[1]:
                    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(y), format="fltp", layout=layout)
                    fr.sample_rate, fr.pts, fr.time_base = arate, pos, Fraction(1, arate)
                    pos += y.shape[1]
                    for p in st.encode(fr):
                        o.mux(p)
        try:
            for _, im, m in itertools.chain([first], it):
                fr = av.VideoFrame.from_ndarray(np.asarray(overlay(panel(im), m, scale=scale)), format="rgb24")
                fr.pts, fr.time_base = done, 1 / fps
                for p in vs.encode(fr):
                    o.mux(p)
                done += 1
                audio_until(round(done / fps * arate))
        except Damaged as e:
            err = e
        for p in [*vs.encode(), *st.encode()]:
            o.mux(p)
    if err:
        raise Damaged(err.args[0], done)
    return done


# ----------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------
def cmd_videos(a):
    videos = files_by_stem(a.src, VIDEO_EXT)
    if not videos:
        raise C.UserError(f"no video files ({', '.join(sorted(VIDEO_EXT))}) under {a.src}")
    out = prepare_root(a.out)
    manifest = read_manifest(out)
    todo = to_make(out, {v: str(p) for v, p in videos.items()}, manifest, settings_key(a.sr, a.time), a.workers)
    print(f"{len(videos)} videos under {a.src}: {len(videos) - len(todo)} already done, {len(todo)} to process")
    run_jobs(process_video, [(v, videos[v], str(out), a.sr, a.time) for v in todo], out, a.workers, manifest)
    write_all_split(out, manifest)


def prepare_pairs(out, ids, imgs: dict, auds: dict, a, upright: bool) -> dict:
    """Frames + audio files paired by id -> the layout; returns the manifest."""
    manifest = read_manifest(out)
    sources = {v: pair_source(imgs.get(v), auds.get(v)) for v in ids}
    todo = to_make(out, sources, manifest, settings_key(a.sr), a.workers)
    print(f"{len(ids)} ids: {len(ids) - len(todo)} already done, {len(todo)} to process")
    jobs = [(v, imgs.get(v), auds.get(v), str(out), a.sr, upright) for v in todo]
    run_jobs(process_pair, jobs, out, a.workers, manifest)
    return manifest


def cmd_frames(a):
    imgs, auds = files_by_stem(a.src, IMAGE_EXT), files_by_stem(a.src, AUDIO_EXT)
    ids = sorted(set(imgs) | set(auds))
    if not ids:
        raise C.UserError(f"no frames or audio files under {a.src}")
    out = prepare_root(a.out)
    write_all_split(out, prepare_pairs(out, ids, imgs, auds, a, upright=True))


def write_all_split(out, manifest):
    ok = sorted(k for k, r in manifest.items() if r["status"] == "ok")
    (Path(out) / "splits" / "all.txt").write_text("\n".join(ok) + ("\n" if ok else ""))
    if not ok:
        raise C.UserError(f"no clip could be prepared in {out} (the reasons are in the table above and in "
                          f"{Path(out) / 'manifest.csv'})")
    print(f"{len(ok)} clips ready; id list in {Path(out) / 'splits' / 'all.txt'}")


def merge_annotations(out, entries: list):
    p = Path(out) / "annotations.json"
    old = json.loads(p.read_text()) if p.is_file() else []
    new_ids = {e["file"] for e in entries}
    C.write_json(p, [e for e in old if e["file"] not in new_ids] + entries)


def parse_flickr_xml(path) -> list[list[float]]:
    """The boxes of one Flickr-SoundNet XML as the official readers take them: every <bbox> grandchild of the root,
    its first element skipped, the next four read as integers and normalised by the 256-px canvas (exact)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise C.UserError(f"{path}: malformed XML ({e})") from None
    boxes = []
    for g in (g for child in root for g in child if g.tag == "bbox"):
        vals = [c.text for c in list(g)[1:5]]
        try:
            boxes.append([int(str(v).strip()) / 256.0 for v in vals])
        except ValueError:
            raise C.UserError(f"{path}: a <bbox> needs four integer coordinates after its first element, got {vals}") \
                from None
        if len(vals) != 4:
            raise C.UserError(f"{path}: a <bbox> with {len(vals)} coordinates")
    if not boxes:
        raise C.UserError(f"{path}: no <bbox> element")
    return boxes


def flickr_annotations(xml_dir) -> dict:
    """A folder of the original Flickr-SoundNet XMLs -> {id: consensus entry} (common.load_annotations' format)."""
    files = sorted(Path(xml_dir).glob("*.xml"))
    if not files:
        raise C.UserError(f"{xml_dir}: directory without .xml annotation files")
    return {f.stem: {"file": f.stem, "class": "", "bbox": parse_flickr_xml(f), "gt": "consensus"} for f in files}


def cmd_flickr(a):
    """Senocak's Flickr-SoundNet test download: Annotations/<id>.xml plus images and audio somewhere under
    Data/ (any depth); the XMLs are kept (ROOT/flickr_xml/) and converted to consensus entries."""
    src = Path(a.src)
    xml_dir = src / "Annotations"
    if not xml_dir.is_dir():
        raise C.UserError(f"{xml_dir} not found: expected the Flickr-SoundNet test download (Annotations/*.xml)")
    ann = C.load_annotations(xml_dir)
    data = src / "Data" if (src / "Data").is_dir() else src
    imgs, auds = files_by_stem(data, IMAGE_EXT), files_by_stem(data, AUDIO_EXT)      # id clashes: before any write
    out = prepare_root(a.out)
    keep = out / "flickr_xml"
    keep.mkdir(exist_ok=True)
    for vid in ann:
        shutil.copy2(xml_dir / f"{vid}.xml", keep / f"{vid}.xml")
    manifest = prepare_pairs(out, sorted(ann), imgs, auds, a, upright=False)   # the official loaders ignore EXIF
    ok = [v for v in sorted(ann) if manifest.get(v, {}).get("status") == "ok"]
    if not ok:
        raise C.UserError(f"none of the {len(ann)} annotated ids could be prepared (reasons in {out / 'manifest.csv'})")
    merge_annotations(out, [ann[v] for v in sorted(ann)])
    (out / "splits" / "flickr_test.txt").write_text("\n".join(ok) + "\n")
    print(f"Flickr-SoundNet test: {len(ok)} of {len(ann)} annotated ids prepared -> splits/flickr_test.txt "
          f"(the official lists use 249: id {FLICKR_MISSING} of the original 250 was never released"
          f"{'' if FLICKR_MISSING not in ann else '; it is present here'})")


def write_present(root, name: str, ids) -> tuple[list, list]:
    """ROOT/splits/NAME.txt: the ids of `ids` whose frame and WAV are under ROOT; NAME.missing.txt the others."""
    present = [v for v in ids if (root / "frames" / f"{v}.jpg").is_file() and (root / "audio" / f"{v}.wav").is_file()]
    missing = [v for v in ids if v not in set(present)]
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / f"{name}.txt").write_text("\n".join(present) + "\n")
    (root / "splits" / f"{name}.missing.txt").write_text("\n".join(missing) + ("\n" if missing else ""))
    return present, missing


def cmd_vggss(a):
    """VGG-SS: annotations from the original vggss.json and the test split of the clips present in --clips; with
    --heard-lists, LVS's open-set splits (110 heard classes to train on; the VGG-SS clips of those and of 110 others
    to test on)."""
    root = Path(a.clips)
    ann = C.load_annotations(a.json)
    lists = [C.read_split(f) for f in a.heard_lists or []]
    for f, ids, what in zip(a.heard_lists or [], lists, ("", "heard test", "unheard test")):
        if what and not set(ids) <= set(ann):
            raise C.UserError(f"{f}: {len(set(ids) - set(ann))} of its {len(ids)} ids are not in {a.json}; "
                              f"--heard-lists takes vggss_heard.txt, vggss_heard_test.csv, vggss_unheard_test.csv "
                              f"in this order")
    present, missing = write_present(root, a.name, list(ann))
    for name, ids in zip(("heard_train", "heard_test", "unheard_test"), lists):
        n, miss = write_present(root, name, ids)
        print(f"open set: splits/{name}.txt {len(n)} present / {len(ids)} listed ({len(miss)} missing, in "
              f"splits/{name}.missing.txt)")
    merge_annotations(root, list(json.loads(Path(a.json).read_text())))
    empty = [v for v in ann if C.gt_map(ann[v]).sum() == 0]
    print(f"VGG-SS: {len(present)} present / {len(ann)} annotated -> splits/{a.name}.txt; "
          f"{len(missing)} missing listed in splits/{a.name}.missing.txt; annotations merged into annotations.json")
    if empty:
        print(f"note: {len(empty)} entries have an empty ground truth (scored 0 by the official code): {', '.join(empty)}")


def read_json_list(path, what: str) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise C.UserError(f"{path}: not found ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise C.UserError(f"{path}: not valid json ({e})") from None
    if not isinstance(data, list) or not data:
        raise C.UserError(f"{path}: expected a non-empty json list ({what})")
    return data


def pixel_box(v: int) -> float:
    """A 224-pixel coordinate as the smallest normalised float that common.rasterize_box turns back into it
    (int(224 * (61 / 224)) is 60)."""
    x = v / C.GT_SIZE
    while int(C.GT_SIZE * x) < v:
        x = math.nextafter(x, 2.0)
    return x


def cmd_is3(a):
    """IS3 (Senocak et al., TPAMI 2025): SRC/images, SRC/audio_wav and the annotation list (SRC/IS3_annotation.json,
    or --boxes: SSLalignment's metadata/synthetic3240_bbox.json) of {"image", "audio", "gt_box": [x1, y1, x2, y2] in
    224-pixel units}; the files are matched by name under SRC (the list's paths are the authors' machine's)."""
    src, meta = Path(a.src), Path(a.boxes or Path(a.src) / "IS3_annotation.json")
    imgs, auds = files_by_stem(src / "images", IMAGE_EXT), files_by_stem(src / "audio_wav", AUDIO_EXT)
    ann, aud_of = {}, {}
    for k, e in enumerate(read_json_list(meta, "the IS3 annotation list")):
        if not isinstance(e, dict) or not all(isinstance(e.get(f), str) for f in ("image", "audio")):
            raise C.UserError(f"{meta} entry {k}: needs string 'image' and 'audio' paths")
        vid = e["image"].split("/")[-1].split(".")[0]            # SSLalignment load_all_bboxes('is3')
        try:
            box = [int(v) for v in e["gt_box"]]                   # bbox2gtmap: map[y1:y2, x1:x2] = 1, int pixels
        except (KeyError, TypeError, ValueError):
            raise C.UserError(f"{meta} entry {k} ({vid}): no 'gt_box' of four numbers; give the box list with "
                              f"--boxes synthetic3240_bbox.json") from None
        if len(box) != 4 or min(box) < 0 or max(box) > C.GT_SIZE:
            raise C.UserError(f"{meta} entry {k} ({vid}): gt_box {e['gt_box']} is not 4 coordinates in [0, 224]")
        if vid in ann:
            raise C.UserError(f"{meta} entry {k}: duplicate image {vid}")
        aud_of[vid] = auds.get(Path(e["audio"].split("/")[-1]).stem)
        ann[vid] = {"file": vid, "class": vid.split("_")[-1], "bbox": [[pixel_box(v) for v in box]],
                    "group": "_".join(vid.split("_")[:-1])}
    out = prepare_root(a.out)
    manifest = prepare_pairs(out, list(ann), imgs, aud_of, a, upright=False)
    groups = {}
    for v in ann:
        groups.setdefault(ann[v]["group"], []).append(v)
    bad = {g for g, vs in groups.items() if len(vs) < 2 or any(manifest[v]["status"] != "ok" for v in vs)}
    ok = [v for v in ann if ann[v]["group"] not in bad]
    if not ok:
        raise C.UserError(f"no IS3 image could be prepared with all its annotations (see {out / 'manifest.csv'})")
    own = {}
    for v in ok:
        own.setdefault(ann[v]["group"], set()).add(ann[v]["class"])
    for k, v in enumerate(ok):    # --negatives' off-screen audio: the next clip of a class in neither of the image's
        ann[v]["offscreen"] = next((ok[j % len(ok)] for j in range(k + 1, k + len(ok))     # sources (vssl_eval: random)
                                    if ann[ok[j % len(ok)]]["class"] not in own[ann[v]["group"]]), None)
    merge_annotations(out, [ann[v] for v in ok])
    (out / "splits" / "test.txt").write_text("\n".join(ok) + "\n")
    print(f"IS3: {len(ok)} annotations of {len(groups) - len(bad)} images -> splits/test.txt"
          + (f"; {len(bad)} images left out (an annotation missing or unreadable): {', '.join(sorted(bad)[:5])}"
             if bad else ""))


AVS_DIRS = {"s4": ("Single-source", "s4_data"), "ms3": ("Multi-sources", "ms3_data")}


def read_mask(path) -> np.ndarray:
    """An AVSBench mask PNG as ACL-SSL reads it (ToTensor of Image.open(p).convert('1')): 0/1 float32, 224 x 224."""
    try:
        with Image.open(path) as im:
            g = np.asarray(im.convert("1"), np.float32)
    except Exception as e:
        raise C.UserError(f"{path}: " + ("mask file not found" if isinstance(e, FileNotFoundError) else
                                         f"cannot read the mask image ({e})")) from None
    if g.shape != (C.GT_SIZE, C.GT_SIZE):
        raise C.UserError(f"{path}: a {g.shape[1]}x{g.shape[0]} mask; AVSBench masks are {C.GT_SIZE}x{C.GT_SIZE}")
    return g


def cmd_avsbench(a):
    """AVSBench-object v1 (S4 / MS3) test split: one id <vid>_<k> per annotated frame, its frame (k = 1..5, the
    clip's second k - 1 + 15/16), its mask (ROOT/masks/<id>.png, a "mask" entry in annotations.json) and a WAV: the
    clip's audio turned circularly so that the frame's time is its centre (each method's centred window is then
    centred on the frame), or with --whole-clip the clip's audio unchanged for all five frames (ACL-SSL's pairing)."""
    src = Path(a.src)
    src = src / AVS_DIRS[a.subset][0] if (src / AVS_DIRS[a.subset][0]).is_dir() else src
    meta, data = src / f"{a.subset}_meta_data.csv", src / AVS_DIRS[a.subset][1]
    try:
        rows = list(csv.reader(meta.open(newline="")))
    except FileNotFoundError:
        raise C.UserError(f"{meta}: not found; SRC is the release's Single-source/ (s4) or Multi-sources/ (ms3) "
                          f"folder") from None
    if not rows or "split" not in rows[0]:
        raise C.UserError(f"{meta}: its header row names no 'split' column")
    col = rows[0].index("split")
    test = [r for r in rows[1:] if len(r) > col and r[col] == "test"]
    if not test:
        raise C.UserError(f"{meta}: no video of the test split")
    out = prepare_root(a.out)
    (out / "masks").mkdir(exist_ok=True)
    ann, missing = [], []
    for r in test:
        vid, cat = r[0], (r[2] if a.subset == "s4" else "")
        sub = Path("test", cat) if a.subset == "s4" else Path("test")
        wav = data / "audio_wav" / sub / f"{vid}.wav"
        wav = wav if wav.is_file() or a.subset == "s4" else data / "audio_wav" / f"{vid}.wav"
        try:
            x = decode_audio(wav, a.sr)["x"]
        except Exception as e:                               # recorded, the other clips go on
            missing += [f"{vid}_{k}\t{wav}: {e}" for k in range(1, 6)]
            continue
        for k in range(1, 6):
            vid_k = f"{vid}_{k}"
            img = data / "visual_frames" / (sub / vid / f"{vid}_{k}.png" if a.subset == "s4" else
                                             Path(vid) / f"{vid}.mp4_{k}.png")
            mask = data / "gt_masks" / sub / vid / f"{vid}_{k}.png"
            try:
                frame, _ = load_frame(img, upright=False)[0], read_mask(mask)
            except (ClipError, C.UserError) as e:
                missing.append(f"{vid_k}\t{img}: {e}")
                continue
            save_jpeg(frame, out / "frames" / f"{vid_k}.jpg")
            shutil.copyfile(mask, out / "masks" / f"{vid_k}.png")
            t = round((k - 1 + 15 / 16) * a.sr)
            write_wav(out / "audio" / f"{vid_k}.wav", x if a.whole_clip else np.roll(x, len(x) // 2 - t), a.sr)
            ann.append({"file": vid_k, "class": cat, "bbox": [], "mask": f"masks/{vid_k}.png"})
    if not ann:
        raise C.UserError(f"no test frame of {meta} could be prepared (first problem: {missing[0]})")
    merge_annotations(out, ann)
    (out / "splits" / "test.txt").write_text("".join(e["file"] + "\n" for e in ann))
    (out / "splits" / "test.missing.txt").write_text("".join(m + "\n" for m in missing))
    empty = sum(read_mask(out / e["mask"]).sum() == 0 for e in ann)
    print(f"AVSBench {a.subset}: {len(ann)} test frames of {len(test)} videos -> splits/test.txt ({empty} with an "
          f"empty mask; {len(missing)} missing, listed in splits/test.missing.txt); audio: "
          + ("the whole clip for every frame" if a.whole_clip else "centred on each frame's time"))


def cmd_synth(a):
    if a.image_size < 32:
        raise C.UserError(f"--image-size {a.image_size}: the synthetic frames need at least 32 pixels")
    if not (math.isfinite(a.scale) and a.scale > 0):
        raise C.UserError(f"--scale {a.scale}: must be a number > 0 (each split keeps at least 4 clips)")
    if a.seed < 0:
        raise C.UserError(f"--seed {a.seed}: must be >= 0")
    sizes = dict(SYNTH_DEFAULTS["sizes"])
    if a.scale != 1.0:
        sizes = {k: max(4, int(round(v * a.scale))) for k, v in sizes.items()}
    make_synthetic(a.out, seed=a.seed, n_classes=a.classes, image_size=a.image_size, sizes=sizes,
                   background=a.background, objects=a.objects, sound=a.sound)


def cmd_split(a):
    root = Path(a.root)
    ids = C.read_split(a.list)
    present = [i for i in ids if (root / "frames" / f"{i}.jpg").is_file() and (root / "audio" / f"{i}.wav").is_file()]
    missing = [i for i in ids if i not in set(present)]
    (root / "splits").mkdir(parents=True, exist_ok=True)
    out = root / "splits" / f"{a.name}.txt"
    out.write_text("\n".join(present if a.present_only else ids) + "\n")
    print(f"{out}: {len(present if a.present_only else ids)} ids ({len(present)} of {len(ids)} listed ids present)")
    if missing:
        miss = root / "splits" / f"{a.name}.missing.txt"
        miss.write_text("\n".join(missing) + "\n")
        print(f"{len(missing)} listed ids have no frame/wav under {root}; listed in {miss}")


def frame_time(v: str) -> str:
    """--time: 'middle' or a finite number of seconds >= 0 (checked once, as an argument error)."""
    if v == "middle":
        return v
    try:
        t = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is neither 'middle' nor a number of seconds") from None
    if not math.isfinite(t) or t < 0:
        raise argparse.ArgumentTypeError(f"{v}: the frame time must be a finite number of seconds >= 0")
    return v


# The audio each method reads (its av_dataset calls): (seconds, where) at 16 kHz. A WAV shorter than a window is
# tiled; one shorter than a quarter of it is refused (common.read_wav_window applies both rules and the rate).
METHOD_WINDOWS = {"lvs_hardway": [(3.0, "center"), (10.0, "start")], "ez_vsl": [(3.0, "center")],
                  "sspl": [(3.0, "center_tiled")], "csol_classaware": [(1.0, "center")]}


def clip_problems(job):
    """Decode one clip's frame (PIL, every pixel) and WAV -> (id, problems, methods that tile a window).
    With methods, the WAV is read as each of them reads it (rate sr, every window); a problem that not all of
    them meet names those that do."""
    root, vid, sr, methods = job
    problems, tiled, refused = [], set(), {}
    try:
        C.load_image(Path(root) / "frames" / f"{vid}.jpg", vid)
    except Exception as e:  # anything a broken file raises is a reason, never a crash of the check
        problems.append(str(e) if isinstance(e, C.UserError) else f"frame: {type(e).__name__}: {e}")
    wav = Path(root) / "audio" / f"{vid}.wav"
    for m, seconds, where in [(m, s, w) for m in methods for s, w in METHOD_WINDOWS[m]] or [(None, 0, "")]:
        try:
            if m is None:
                C.read_wav(wav)
            elif C.read_wav_window(wav, seconds, where, vid, sample_rate=sr)[2]:
                tiled.add(m)
        except Exception as e:
            refused.setdefault(str(e) if isinstance(e, C.UserError) else f"{wav}: {type(e).__name__}: {e}", set()).add(m)
    problems += [msg if len(ms) == max(1, len(methods)) else f"{msg} ({', '.join(sorted(ms))})"
                 for msg, ms in refused.items()]
    return vid, problems, tiled - set().union(*refused.values())


def cmd_check(a):
    """Decode every frame and WAV of a split (or of every clip under ROOT) in parallel, reading the WAVs as the
    methods do; write the bad ids with their reasons to ROOT/check_<NAME>.txt; exit status 1 if any is bad."""
    root = Path(a.root)
    if not root.is_dir():
        raise C.UserError(f"{root}: no such dataset root")
    if a.split:
        split = Path(a.split) if Path(a.split).suffix == ".txt" else root / "splits" / f"{a.split}.txt"
        ids, name = C.read_split(split), split.stem
    else:
        ids = sorted({p.stem for p in (root / "frames").glob("*.jpg")} |
                     {p.stem for p in (root / "audio").glob("*.wav")})
        name = "all"
        if not ids:
            raise C.UserError(f"{root}: no frames/*.jpg or audio/*.wav to check")
    out = Path(a.report) if a.report else root / f"check_{name}.txt"
    C.check_file_writable(out, "the report (--report)")              # before the decoding, not after it
    methods = [a.method] if a.method else list(METHOD_WINDOWS)
    bad, tiled = {}, {m: [] for m in methods}
    for vid, problems, t in pmap(clip_problems, [(str(root), v, a.sr, methods) for v in ids], a.workers, "check", 16):
        if problems:
            bad[vid] = "; ".join(problems)
        for m in t:
            tiled[m].append(vid)
    tmp = Path(str(out) + ".part")
    tmp.write_text("".join(f"{v}\t{bad[v]}\n" for v in sorted(bad)))
    os.replace(tmp, out)
    print(f"checked {len(ids)} clips ({'split ' + name if a.split else 'every clip under ' + str(root)}) as "
          f"{', '.join(methods)} read them ({a.sr} Hz): {len(ids) - len(bad)} ok, {len(bad)} bad; bad ids and "
          f"reasons in {out}")
    for v in sorted(bad)[:5]:
        print(f"  {v}: {bad[v]}")
    for m, vids in tiled.items():
        if vids:
            print(f"  {m} will tile (as the official code does) the audio of {len(vids)} clips shorter than its "
                  f"window: {', '.join(sorted(vids)[:3])}{' ...' if len(vids) > 3 else ''}")
    if bad:
        if not a.method:
            print("  (--method NAME applies one method's rules only)")
        sys.exit(1)


def cmd_video(a):
    w, h = (int(v) for v in a.size.split("x"))
    m = moving_clip(a.out, a.seed, a.classes, h, a.seconds, a.fps, width=w)
    names = [k[0] for k in SYNTH_CLASSES]
    print(f"{a.out}: {names[m['classes'][0]]} sounds, {names[m['classes'][1]]} is silent ({len(m['times'])} frames)")


def ingest_args(s, src_help: str):
    """The arguments every ingesting subcommand shares."""
    s.add_argument("src", help=src_help)
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--sr", type=int, default=16000, help="audio sample rate to write (Hz)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("videos", help="a folder of videos -> frames + wav",
                       description="Reads every video under SRC (any depth; the file stem is the id, e.g. VGG-Sound's "
                                   "<ytid>_<start:06d>; two files with one id are refused). Writes "
                                   "ROOT/frames/<id>.jpg (the frame a player shows at --time on the clip's clock, "
                                   "turned upright by the display matrix), ROOT/audio/<id>.wav (the whole audio track "
                                   "placed by its timestamps on the same clock, mono PCM16 at --sr), "
                                   "ROOT/manifest.csv and ROOT/splits/all.txt. Exits with status 2 if no clip is "
                                   "ready.")
    ingest_args(s, "folder with the videos")
    s.add_argument("--time", default="middle", type=frame_time,
                   help="frame time: 'middle' of the clip (container start + duration / 2) or SECONDS (>= 0) "
                        "from its start")
    s.set_defaults(fn=cmd_videos)
    s = sub.add_parser("frames", help="already-extracted frames + audio -> the layout",
                       description="Pairs image files (jpg/png) and audio files (wav/flac/mp3/m4a/...) under SRC by "
                                   "file stem; writes RGB JPEG frames (turned upright by their EXIF orientation), "
                                   "mono PCM16 WAV at --sr, the manifest (an id with only one of the two is "
                                   "'missing') and ROOT/splits/all.txt.")
    ingest_args(s, "folder with frames and audio files (any depth)")
    s.set_defaults(fn=cmd_frames)
    s = sub.add_parser("flickr", help="the Flickr-SoundNet test download",
                       description="Reads SRC/Annotations/<id>.xml and the images + audio under SRC/Data (any depth). "
                                   "Writes frames, audio, the manifest, ROOT/flickr_xml/ (the original XMLs), "
                                   "consensus entries in ROOT/annotations.json and ROOT/splits/flickr_test.txt. "
                                   "Images keep their stored pixels (EXIF orientation ignored, as the official "
                                   "loaders do).")
    ingest_args(s, "the unpacked download (with Annotations/ and Data/)")
    s.set_defaults(fn=cmd_flickr)
    s = sub.add_parser("vggss", help="VGG-SS test split + annotations from the clips present",
                       description="Reads the original vggss.json and the clips already in ROOT (prepare them with "
                                   "'videos' first). Writes ROOT/splits/NAME.txt (present ids), NAME.missing.txt, and "
                                   "merges the 5158 entries into ROOT/annotations.json; reports N present / 5158.")
    s.add_argument("--json", required=True, help="the original vggss.json")
    s.add_argument("--clips", required=True, help="dataset root holding the prepared clips")
    s.add_argument("--name", default="vggss_test", help="split name")
    s.add_argument("--heard-lists", nargs=3, metavar=("HEARD", "HEARD_TEST", "UNHEARD_TEST"),
                   help="the open-set lists vggss_heard.txt vggss_heard_test.csv vggss_unheard_test.csv (EZ-VSL's "
                        "metadata/): writes splits/heard_train.txt, heard_test.txt, unheard_test.txt of the clips "
                        "present (and NAME.missing.txt each)")
    s.set_defaults(fn=cmd_vggss)
    s = sub.add_parser("avsbench", help="AVSBench-object v1 S4 / MS3 test masks",
                       description=cmd_avsbench.__doc__ + " Writes frames, audio (mono PCM16 at --sr), masks, "
                       "annotations.json and splits/test.txt (+ test.missing.txt).")
    s.add_argument("src", help="the release's avsbench_data/Single-source/ (s4) or Multi-sources/ (ms3) folder")
    s.add_argument("--subset", required=True, choices=sorted(AVS_DIRS))
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--sr", type=int, default=16000, help="audio sample rate to write (Hz)")
    s.add_argument("--whole-clip", action="store_true", help="every frame gets the clip's whole audio (ACL-SSL)")
    s.set_defaults(fn=cmd_avsbench)
    s = sub.add_parser("is3", help="the IS3 benchmark (two sources per image)",
                       description=cmd_is3.__doc__ + " Writes one id per annotation (its image as a JPEG, its audio, "
                       "its box, its image as 'group') into annotations.json and splits/test.txt; an image with an "
                       "annotation missing is left out and named.")
    ingest_args(s, "the unpacked IS3 release (images/, audio_wav/, IS3_annotation.json)")
    s.add_argument("--boxes", help="the box list (SSLalignment metadata/synthetic3240_bbox.json) instead of "
                                   "SRC/IS3_annotation.json")
    s.set_defaults(fn=cmd_is3)
    s = sub.add_parser("synth", help="write the synthetic benchmark",
                       description="Writes ROOT/frames, ROOT/audio (16 kHz mono PCM16, 3 s), ROOT/splits/{train,val,"
                                   "test,cocktail_train,cocktail_val,cocktail_test}.txt, ROOT/annotations.json and "
                                   "ROOT/synth.json. Deterministic by --seed.")
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--classes", type=int, default=6, help="number of object classes (4-8)")
    s.add_argument("--image-size", type=int, default=128, help="frame side in pixels (>= 32)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="multiply every split size by this factor (> 0; at least 4 clips per split)")
    s.add_argument("--background", choices=SYNTH_STYLES["background"], default="grey",
                   help="grey clutter (default) or coloured texture: gratings, colour noise, coloured clutter")
    s.add_argument("--objects", choices=SYNTH_STYLES["objects"], default="large",
                   help="object side / frame side: large 0.48-0.62 (default), small 0.16-0.3, mixed 0.2-0.6")
    s.add_argument("--sound", choices=SYNTH_STYLES["sound"], default="tone",
                   help="each class's sound: harmonic tone (default), chirp (a sweep f0 -> 1.6 f0 per pulse) or "
                        "noise (band-passed around f0)")
    s.set_defaults(fn=cmd_synth)
    s = sub.add_parser("video", help="a synthetic video: a sounding object crosses the frame beside a silent one",
                       description="Writes OUT (.mkv or .mov: H.264 + PCM) in the synthetic benchmark's world: an "
                                   "object of one class sounds while it crosses the upper half, a silent one of "
                                   "another class crosses the lower half (try a method's --predict --video on it).")
    s.add_argument("out", help="the video to write (.mkv or .mov)")
    s.add_argument("--size", default="128x128", help="WIDTHxHEIGHT in pixels")
    s.add_argument("--seconds", type=float, default=3.0, help="length")
    s.add_argument("--fps", type=int, default=10, help="frame rate")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--classes", type=int, default=6, help="draw the two objects from the first N classes (4-8)")
    s.set_defaults(fn=cmd_video)
    s = sub.add_parser("split", help="register an id list as a split",
                       description="Reads LIST (one id per line, or the first column of a csv) and writes "
                                   "ROOT/splits/NAME.txt; ids without frames/<id>.jpg and audio/<id>.wav are "
                                   "reported and listed in ROOT/splits/NAME.missing.txt.")
    s.add_argument("list", help="id list (.txt or .csv)")
    s.add_argument("--name", required=True, help="split name (e.g. test, vggss_10k)")
    s.add_argument("--root", required=True, help="dataset root in the standard layout")
    s.add_argument("--present-only", action="store_true", help="keep only the ids whose files are present")
    s.set_defaults(fn=cmd_split)
    s = sub.add_parser("check", help="decode every frame and WAV (run before a long training run)",
                       description="Decodes every frame (PIL, all pixels) and WAV of a split, or of every clip under "
                                   "ROOT, in parallel, reading each WAV as the methods do (rate --sr, every audio "
                                   "window of each method: too short is refused). Writes the bad ids with their "
                                   "reasons to ROOT/check_<NAME>.txt (NAME: the split, or 'all'), prints a summary "
                                   "(with the clips each method will tile) and exits with status 1 if any clip is "
                                   "bad.")
    s.add_argument("root", help="dataset root in the standard layout")
    s.add_argument("--split", help="split name (ROOT/splits/NAME.txt) or a .txt id list (default: every clip)")
    s.add_argument("--method", choices=sorted(METHOD_WINDOWS),
                   help="apply this method's audio windows only (default: all four)")
    s.add_argument("--sr", type=int, default=16000, help="the sample rate the WAVs must have (every method: 16000)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes")
    s.add_argument("--report", help="where to write the bad ids (default ROOT/check_<NAME>.txt)")
    s.set_defaults(fn=cmd_check)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    C.run_cli(main)
