"""data_prep.py - turn data into the standard layout (see common.py's docstring and the README).

    python data_prep.py synth --out ROOT                     the built-in synthetic benchmark
    python data_prep.py videos SRC --out ROOT [--sr 16000] [--time middle|SECONDS] [--workers N]
                                                             a folder of videos (VGG-Sound style <ytid>_<start:06d> names or any)
    python data_prep.py frames SRC --out ROOT [--sr 16000]   frames (jpg/png) + audio (wav/flac/mp3/m4a) already extracted
    python data_prep.py flickr SRC --out ROOT                the Flickr-SoundNet test download (Data/... + Annotations/*.xml)
    python data_prep.py vggss --json vggss.json --clips ROOT the VGG-SS test split + annotations from the clips present
    python data_prep.py split LIST --name NAME --root ROOT   any id list (*.txt / *.csv) as ROOT/splits/NAME.txt
    python data_prep.py check ROOT [--split NAME] [--workers N]  decode every frame and WAV (before a long run)

The synthetic benchmark's generator lives here: a method run without --data imports it (data_prep.py must then
sit beside common.py); with --data nothing here is needed.

Every ingesting command writes ROOT/manifest.csv (id, status ok/missing/failed, reason, frame time, duration,
source sample rate, fps measured from the frame timestamps, audio duration, the settings the clip was made with),
skips ids already done with the same settings when re-run (a clip made with another --sr / --time is made again),
never replaces a broken clip by another one, writes each output atomically, and ends with a summary table. A clip
whose audio is much shorter than its video is kept ('ok') with a warning in its reason.
Run `python data_prep.py SUBCOMMAND --help` for details.
"""
import argparse
import csv
import json
import math
import os
import sys
import shutil
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common as C

VIDEO_EXT = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp"}
IMAGE_EXT = {".jpg", ".jpeg", ".png"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus"}
MANIFEST_FIELDS = ["id", "status", "reason", "frame_time", "duration", "src_sr", "fps", "audio_duration", "settings"]
SHORT_AUDIO = 0.8    # audio shorter than this fraction of the video (and by more than 0.5 s) is reported
FLICKR_MISSING = "3908875357"   # in the original 250-image test list, absent from the released data


# ----------------------------------------------------------------------------------------------------------
# Decoding with PyAV
# ----------------------------------------------------------------------------------------------------------
class ClipError(Exception):
    """A broken clip: recorded in the manifest with its reason, then skipped."""


def decode_audio(container, sr: int) -> tuple[np.ndarray, int]:
    """All audio of the first audio stream, down-mixed to mono by FFmpeg's resampler at rate sr (float32)."""
    import av
    if not container.streams.audio:
        raise ClipError("no audio stream")
    st = container.streams.audio[0]
    src_sr = st.codec_context.sample_rate or st.rate or 0
    res = av.AudioResampler(format="s16", layout="mono", rate=sr)
    chunks = []
    try:
        for frame in container.decode(st):
            frame.pts = None
            chunks += [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    except av.error.FFmpegError as e:
        if not chunks:
            raise ClipError(f"audio decoding failed ({e})") from None
    x = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    if x.size == 0:
        raise ClipError("zero-length audio")
    return x, src_sr


def frame_at(container, t: float):
    """The video frame displayed at time t (s, from the stream start): the last frame whose timestamp <= t,
    found by seeking to the key frame before t and decoding forward. Returns (PIL image, its time, fps)."""
    import av
    if not container.streams.video:
        raise ClipError("no video stream")
    vs = container.streams.video[0]
    fps = float(vs.average_rate) if vs.average_rate else 0.0
    start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
    target = start + t
    try:
        container.seek(max(0, int((target - 1.0) / vs.time_base)), stream=vs, backward=True, any_frame=False)
    except av.error.FFmpegError:
        container.seek(0)
    best = None
    try:
        for frame in container.decode(vs):
            ft = float(frame.pts * vs.time_base) if frame.pts is not None else None
            if ft is None:
                continue
            if ft <= target + 1e-6 or best is None:
                best = (frame, ft)
            if ft > target + 1e-6:
                break
    except av.error.FFmpegError as e:
        if best is None:
            raise ClipError(f"video decoding failed ({e})") from None
    if best is None:
        raise ClipError("no decodable video frame")
    return best[0].to_image().convert("RGB"), best[1] - start, fps


def measured_fps(path) -> float | None:
    """The frame rate measured from the video packets' timestamps: (frames - 1) / (last - first timestamp).
    A variable-frame-rate file reports its real mean rate, not the nominal rate of its header."""
    import av
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        pts = sorted(float(p.pts * vs.time_base) for p in c.demux(vs) if p.pts is not None and p.size)
    return (len(pts) - 1) / (pts[-1] - pts[0]) if len(pts) > 1 and pts[-1] > pts[0] else None


def video_duration(container) -> float:
    if container.duration:
        return container.duration / 1e6
    durs = [float(s.duration * s.time_base) for s in container.streams if s.duration]
    return max(durs) if durs else 0.0


def save_jpeg(img, path):
    tmp = Path(str(path) + ".part")
    img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def process_video(job):
    """One video -> frames/<id>.jpg + audio/<id>.wav; returns a manifest row (never raises)."""
    import av
    vid, src, out, sr, when = job
    row = dict(id=vid, status="failed", reason="", frame_time="", duration="", src_sr="", fps="", audio_duration="",
               settings=settings_key(sr, when))
    try:
        try:
            container = av.open(str(src))
        except (av.error.FFmpegError, OSError) as e:
            raise ClipError(f"cannot open ({type(e).__name__}: {e})") from None
        with container:
            dur = video_duration(container)
            row["duration"] = f"{dur:.3f}"
            if dur <= 0:
                raise ClipError("zero length")
            t = dur / 2 if when == "middle" else float(when)
            if t > dur:
                raise ClipError(f"shorter ({dur:.2f} s) than the requested frame time {t:.2f} s")
            img, ft, fps = frame_at(container, t)
            row["frame_time"], row["fps"] = f"{ft:.3f}", f"{measured_fps(src) or fps:.3f}"
        with av.open(str(src)) as container:
            x, src_sr = decode_audio(container, sr)
            row["src_sr"], row["audio_duration"] = str(src_sr), f"{len(x) / sr:.3f}"
        if len(x) / sr < SHORT_AUDIO * dur and dur - len(x) / sr > 0.5:
            row["reason"] = f"warning: audio much shorter than the video ({len(x) / sr:.2f} s of {dur:.2f} s)"
        save_jpeg(img, Path(out) / "frames" / f"{vid}.jpg")
        C.write_wav(Path(out) / "audio" / f"{vid}.wav", x, sr)
        row["status"] = "ok"
    except ClipError as e:
        row["reason"] = str(e)
    except Exception as e:  # anything unexpected in a broken file is recorded, the run goes on
        row["reason"] = f"{type(e).__name__}: {e}"
    return row


def process_pair(job):
    """Already-extracted frame + audio file -> the layout (the frame re-encoded as RGB JPEG, the audio as mono
    PCM16 at sr)."""
    import av
    vid, img_path, aud_path, out, sr = job
    row = dict(id=vid, status="failed", reason="", frame_time="", duration="", src_sr="", fps="", audio_duration="",
               settings=settings_key(sr))
    try:
        if img_path is None or aud_path is None:
            row["status"], row["reason"] = "missing", "no frame" if img_path is None else "no audio"
            return row
        try:
            img = C.load_image(img_path)
        except C.UserError as e:
            raise ClipError(str(e)) from None
        try:
            with av.open(str(aud_path)) as container:
                x, src_sr = decode_audio(container, sr)
        except av.error.FFmpegError as e:
            raise ClipError(f"cannot decode audio ({e})") from None
        row["duration"], row["src_sr"] = f"{len(x) / sr:.3f}", str(src_sr)
        row["audio_duration"] = row["duration"]
        save_jpeg(img, Path(out) / "frames" / f"{vid}.jpg")
        C.write_wav(Path(out) / "audio" / f"{vid}.wav", x, sr)
        row["status"] = "ok"
    except ClipError as e:
        row["reason"] = str(e)
    except Exception as e:
        row["reason"] = f"{type(e).__name__}: {e}"
    return row


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


def done(root, vid, manifest, settings: str | None = None) -> bool:
    r = Path(root)
    row = manifest.get(vid, {})
    return row.get("status") == "ok" and (settings is None or row.get("settings") == settings) \
        and (r / "frames" / f"{vid}.jpg").is_file() and (r / "audio" / f"{vid}.wav").is_file()


def run_jobs(fn, jobs, root, workers: int, manifest: dict):
    """Run the jobs (in parallel with --workers), appending each row to the manifest as it completes (so an
    interrupted run keeps what it finished), then print the summary table."""
    if jobs:
        log_path = Path(root) / "manifest.csv"
        write_manifest(root, manifest)                  # (re)written with the current columns before appending
        with open(log_path, "a", newline="") as f:
            w = csv.DictWriter(f, MANIFEST_FIELDS)
            pool = Pool(workers) if workers > 1 else None
            it = pool.imap_unordered(fn, jobs) if pool else map(fn, jobs)
            for row in C.progress(it, "clips", total=len(jobs)):
                manifest[row["id"]] = row
                w.writerow(row)
                f.flush()
            if pool:
                pool.close()
                pool.join()
    write_manifest(root, manifest)
    summary(manifest)


def summary(manifest: dict):
    by = Counter((r["status"], (r.get("reason") or "").split(" (")[0]) for r in manifest.values())
    print(f"{'status':<8} {'count':>7}  reason")
    for (status, reason), n in sorted(by.items(), key=lambda kv: (kv[0][0] != "ok", -kv[1])):
        print(f"{status:<8} {n:>7}  {reason}")
    print(f"{'total':<8} {len(manifest):>7}")


def prepare_root(out):
    out = Path(out)
    for d in ("frames", "audio", "splits"):
        (out / d).mkdir(parents=True, exist_ok=True)
    return out


def files_by_stem(src, exts) -> dict:
    found = {}
    for p in sorted(Path(src).rglob("*")):
        if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


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
                      sizes=dict(train=1200, val=150, test=300, cocktail_train=800, cocktail_val=100, cocktail_test=200))


def default_synth_root() -> Path:
    """Where methods look for (and generate) the synthetic benchmark: $AVSL_SYNTH or data/synth beside this file
    (data_prep.py sits beside common.py and the method files)."""
    return Path(os.environ.get("AVSL_SYNTH", Path(__file__).resolve().parent / "data" / "synth"))


def _class_sound(rng, c: int, n: int, sr: int) -> np.ndarray:
    _, _, _, _, f0, amps, rate = SYNTH_CLASSES[c]
    t = np.arange(n) / sr
    f0 = f0 * (1 + rng.uniform(-0.02, 0.02))
    tone = sum(a * np.sin(2 * np.pi * (h + 1) * f0 * t + rng.uniform(0, 2 * np.pi)) for h, a in enumerate(amps) if a)
    env = 0.15 + 0.85 / (1 + np.exp(-8 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))))
    return tone * env / sum(amps)


def synth_audio(rng, classes, n: int, sr: int) -> np.ndarray:
    """The mixture of the given classes' sounds plus white background noise, peak-normalised to 0.7."""
    x = sum(_class_sound(rng, c, n, sr) for c in classes) + rng.normal(0, rng.uniform(0.05, 0.2), n)
    return 0.7 * x / np.abs(x).max()


def _background(rng, size: int) -> Image.Image:
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


def render_single(rng, n_classes: int, size: int):
    """One single-source scene: (PIL image, sounding class, its normalised box, objects list, sounding mask)."""
    img = _background(rng, size)
    c = int(rng.integers(n_classes))
    others = [int(o) for o in rng.permutation([k for k in range(n_classes) if k != c])[:rng.choice([1, 2], p=[0.6, 0.4])]]
    boxes = _place(rng, size, rng.uniform(0.48, 0.62, 1 + len(others)))
    others = others[:len(boxes) - 1]                # a distractor that does not fit is left out
    objects = []
    for k, b in zip(others, boxes[1:]):            # silent ones first; the sounding object is drawn on top
        _draw_object(img, rng, k, b)
        objects.append((k, b, False))
    mask = _draw_object(img, rng, c, boxes[0])
    objects.append((c, boxes[0], True))
    return img, c, objects, mask


def render_cocktail(rng, n_classes: int, size: int):
    """A 2x2 grid of four single-object tiles of distinct classes; two of them sound."""
    tile = size // 2
    img = Image.new("RGB", (size, size))
    classes = [int(k) for k in rng.permutation(n_classes)[:4]]
    sounding = set(int(i) for i in rng.permutation(4)[:2])
    objects = []
    for q, k in enumerate(classes):
        t = _background(rng, tile)
        s = int(round(rng.uniform(0.6, 0.85) * tile))
        x, y = (int(v) for v in rng.integers(0, tile - s + 1, 2))
        _draw_object(t, rng, k, (x, y, x + s, y + s))
        ox, oy = (q % 2) * tile, (q // 2) * tile
        img.paste(t, (ox, oy))
        objects.append((k, (ox + x, oy + y, ox + x + s, oy + y + s), q in sounding))
    return img, objects


def make_synthetic(root, seed: int = 0, n_classes: int = 6, image_size: int = 128, seconds: float = 3.0,
                   sr: int = 16000, sizes: dict | None = None, log=print) -> Path:
    """Write the synthetic benchmark in the standard layout (deterministic by seed; one rng per clip).

    Splits: train/val/test (single source: the sounding object plus 1-2 silent ones), cocktail_train/val/test
    (2x2 grids, two sounding + two silent tiles, audio mixed). annotations.json covers every id (the methods read
    boxes only for val/test; CSOL's evaluation reads the classes of the clustered items).
    """
    if not 4 <= n_classes <= len(SYNTH_CLASSES):
        raise C.UserError(f"n_classes must be between 4 and {len(SYNTH_CLASSES)}")
    sizes = dict(SYNTH_DEFAULTS["sizes"] if sizes is None else sizes)
    root = Path(root)
    for d in ("frames", "audio", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in SYNTH_CLASSES[:n_classes]]
    n = int(round(seconds * sr))
    ann, t0 = [], time.time()
    for si, (split, count) in enumerate(sizes.items()):
        ids = []
        for i in range(count):
            vid = f"{split}_{i:05d}"
            rng = np.random.default_rng([seed, si, i])
            if split.startswith("cocktail"):
                img, objects = render_cocktail(rng, n_classes, image_size)
                snd = [k for k, _, s in objects if s]
                audio = synth_audio(rng, snd, n, sr)
                entry_class = "+".join(names[k] for k in snd)
            else:
                img, c, objects, _ = render_single(rng, n_classes, image_size)
                audio = synth_audio(rng, [c], n, sr)
                entry_class = names[c]
            norm = lambda b: [round(v / image_size, 6) for v in b]  # noqa: E731
            tmp = root / "frames" / f"{vid}.jpg.part"
            img.save(tmp, format="JPEG", quality=95)
            os.replace(tmp, root / "frames" / f"{vid}.jpg")
            C.write_wav(root / "audio" / f"{vid}.wav", audio, sr)
            ann.append({"file": vid, "class": entry_class, "bbox": [norm(b) for _, b, s in objects if s],
                        "objects": [{"class": names[k], "bbox": norm(b), "sounding": bool(s)} for k, b, s in objects]})
            ids.append(vid)
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        log(f"  synthetic {split}: {count} clips")
    C.write_json(root / "annotations.json", ann)
    meta = dict(seed=seed, n_classes=n_classes, image_size=image_size, seconds=seconds, sr=sr, sizes=sizes,
                classes=names)
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
# Subcommands
# ----------------------------------------------------------------------------------------------------------
def cmd_videos(a):
    out = prepare_root(a.out)
    videos = files_by_stem(a.src, VIDEO_EXT)
    if not videos:
        raise C.UserError(f"no video files ({', '.join(sorted(VIDEO_EXT))}) under {a.src}")
    manifest = read_manifest(out)
    key = settings_key(a.sr, a.time)
    todo = [(v, p, str(out), a.sr, a.time) for v, p in videos.items() if not done(out, v, manifest, key)]
    print(f"{len(videos)} videos under {a.src}: {len(videos) - len(todo)} already done, {len(todo)} to process")
    run_jobs(process_video, todo, out, a.workers, manifest)
    write_all_split(out, manifest)


def cmd_frames(a):
    out = prepare_root(a.out)
    imgs, auds = files_by_stem(a.src, IMAGE_EXT), files_by_stem(a.src, AUDIO_EXT)
    ids = sorted(set(imgs) | set(auds))
    if not ids:
        raise C.UserError(f"no frames or audio files under {a.src}")
    manifest = read_manifest(out)
    todo = [(v, imgs.get(v), auds.get(v), str(out), a.sr) for v in ids
            if not done(out, v, manifest, settings_key(a.sr))]
    print(f"{len(ids)} ids under {a.src}: {len(ids) - len(todo)} already done, {len(todo)} to process")
    run_jobs(process_pair, todo, out, a.workers, manifest)
    write_all_split(out, manifest)


def write_all_split(out, manifest):
    ok = sorted(k for k, r in manifest.items() if r["status"] == "ok")
    (Path(out) / "splits" / "all.txt").write_text("\n".join(ok) + ("\n" if ok else ""))
    print(f"{len(ok)} clips ready; id list in {Path(out) / 'splits' / 'all.txt'}")


def merge_annotations(out, entries: list):
    p = Path(out) / "annotations.json"
    old = json.loads(p.read_text()) if p.is_file() else []
    new_ids = {e["file"] for e in entries}
    C.write_json(p, [e for e in old if e["file"] not in new_ids] + entries)


def cmd_flickr(a):
    """Senocak's Flickr-SoundNet test download: Annotations/<id>.xml plus images and audio somewhere under
    Data/ (any depth); the XMLs are kept (ROOT/flickr_xml/) and converted to consensus entries."""
    src, out = Path(a.src), prepare_root(a.out)
    xml_dir = src / "Annotations"
    if not xml_dir.is_dir():
        raise C.UserError(f"{xml_dir} not found: expected the Flickr-SoundNet test download (Annotations/*.xml)")
    ann = C.load_annotations(xml_dir)
    keep = out / "flickr_xml"
    keep.mkdir(exist_ok=True)
    for vid in ann:
        shutil.copy2(xml_dir / f"{vid}.xml", keep / f"{vid}.xml")
    data = src / "Data" if (src / "Data").is_dir() else src
    imgs, auds = files_by_stem(data, IMAGE_EXT), files_by_stem(data, AUDIO_EXT)
    manifest = read_manifest(out)
    todo = [(v, imgs.get(v), auds.get(v), str(out), a.sr) for v in sorted(ann)
            if not done(out, v, manifest, settings_key(a.sr))]
    run_jobs(process_pair, todo, out, a.workers, manifest)
    ok = [v for v in sorted(ann) if manifest.get(v, {}).get("status") == "ok"]
    merge_annotations(out, [ann[v] for v in sorted(ann)])
    (out / "splits" / "flickr_test.txt").write_text("\n".join(ok) + "\n")
    print(f"Flickr-SoundNet test: {len(ok)} of {len(ann)} annotated ids prepared -> splits/flickr_test.txt "
          f"(the official lists use 249: id {FLICKR_MISSING} of the original 250 was never released"
          f"{'' if FLICKR_MISSING not in ann else '; it is present here'})")


def cmd_vggss(a):
    """VGG-SS: annotations from the original vggss.json and the test split of the clips present in --clips."""
    root = Path(a.clips)
    ann = C.load_annotations(a.json)
    present = [v for v in ann if (root / "frames" / f"{v}.jpg").is_file() and (root / "audio" / f"{v}.wav").is_file()]
    missing = [v for v in ann if v not in set(present)]
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / f"{a.name}.txt").write_text("\n".join(present) + "\n")
    (root / "splits" / f"{a.name}.missing.txt").write_text("\n".join(missing) + ("\n" if missing else ""))
    merge_annotations(root, list(json.loads(Path(a.json).read_text())))
    empty = [v for v in ann if C.gt_map(ann[v]).sum() == 0]
    print(f"VGG-SS: {len(present)} present / {len(ann)} annotated -> splits/{a.name}.txt; "
          f"{len(missing)} missing listed in splits/{a.name}.missing.txt; annotations merged into annotations.json")
    if empty:
        print(f"note: {len(empty)} entries have an empty ground truth (scored 0 by the official code): {', '.join(empty)}")


def cmd_synth(a):
    sizes = dict(SYNTH_DEFAULTS["sizes"])
    if a.scale != 1.0:
        sizes = {k: max(4, int(round(v * a.scale))) for k, v in sizes.items()}
    make_synthetic(a.out, seed=a.seed, n_classes=a.classes, image_size=a.image_size, sizes=sizes)


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


def check_clip(job):
    """Decode one clip's frame (PIL, every pixel) and WAV (common.read_wav) -> (id, reason or None)."""
    root, vid = job
    reasons = []
    for what, fn in (("frame", lambda: C.load_image(Path(root) / "frames" / f"{vid}.jpg")),
                     ("audio", lambda: C.read_wav(Path(root) / "audio" / f"{vid}.wav"))):
        try:
            fn()
        except C.UserError as e:
            reasons.append(str(e))
        except Exception as e:  # anything a broken file raises is a reason, never a crash of the check
            reasons.append(f"{what}: {type(e).__name__}: {e}")
    return vid, "; ".join(reasons) or None


def cmd_check(a):
    """Decode every frame and WAV of a split (or of every clip under ROOT) in parallel; write the bad ids with
    their reasons to ROOT/check_<NAME>.txt; exit status 1 if any is bad."""
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
    jobs = [(str(root), v) for v in ids]
    pool = Pool(a.workers) if a.workers > 1 else None
    it = pool.imap_unordered(check_clip, jobs, chunksize=16) if pool else map(check_clip, jobs)
    bad = dict(r for r in C.progress(it, "check", total=len(jobs)) if r[1])
    if pool:
        pool.close()
        pool.join()
    out = root / f"check_{name}.txt"
    tmp = Path(str(out) + ".part")
    tmp.write_text("".join(f"{v}\t{bad[v]}\n" for v in sorted(bad)))
    os.replace(tmp, out)
    print(f"checked {len(ids)} clips ({'split ' + name if a.split else 'every clip under ' + str(root)}): "
          f"{len(ids) - len(bad)} ok, {len(bad)} bad; bad ids and reasons in {out}")
    for v in sorted(bad)[:5]:
        print(f"  {v}: {bad[v]}")
    if bad:
        sys.exit(1)


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
                                   "<ytid>_<start:06d>). Writes ROOT/frames/<id>.jpg (the frame displayed at --time, "
                                   "found by timestamp, not index), ROOT/audio/<id>.wav (the whole audio track, mono "
                                   "PCM16 at --sr), ROOT/manifest.csv and ROOT/splits/all.txt.")
    ingest_args(s, "folder with the videos")
    s.add_argument("--time", default="middle", type=frame_time,
                   help="frame time: 'middle' of the clip or SECONDS (>= 0) from its start")
    s.set_defaults(fn=cmd_videos)
    s = sub.add_parser("frames", help="already-extracted frames + audio -> the layout",
                       description="Pairs image files (jpg/png) and audio files (wav/flac/mp3/m4a/...) under SRC by "
                                   "file stem; writes RGB JPEG frames, mono PCM16 WAV at --sr, the manifest (an id "
                                   "with only one of the two is 'missing') and ROOT/splits/all.txt.")
    ingest_args(s, "folder with frames and audio files (any depth)")
    s.set_defaults(fn=cmd_frames)
    s = sub.add_parser("flickr", help="the Flickr-SoundNet test download",
                       description="Reads SRC/Annotations/<id>.xml and the images + audio under SRC/Data (any depth). "
                                   "Writes frames, audio, the manifest, ROOT/flickr_xml/ (the original XMLs), "
                                   "consensus entries in ROOT/annotations.json and ROOT/splits/flickr_test.txt.")
    ingest_args(s, "the unpacked download (with Annotations/ and Data/)")
    s.set_defaults(fn=cmd_flickr)
    s = sub.add_parser("vggss", help="VGG-SS test split + annotations from the clips present",
                       description="Reads the original vggss.json and the clips already in ROOT (prepare them with "
                                   "'videos' first). Writes ROOT/splits/NAME.txt (present ids), NAME.missing.txt, and "
                                   "merges the 5158 entries into ROOT/annotations.json; reports N present / 5158.")
    s.add_argument("--json", required=True, help="the original vggss.json")
    s.add_argument("--clips", required=True, help="dataset root holding the prepared clips")
    s.add_argument("--name", default="vggss_test", help="split name")
    s.set_defaults(fn=cmd_vggss)
    s = sub.add_parser("synth", help="write the synthetic benchmark",
                       description="Writes ROOT/frames, ROOT/audio (16 kHz mono PCM16, 3 s), ROOT/splits/{train,val,"
                                   "test,cocktail_train,cocktail_val,cocktail_test}.txt, ROOT/annotations.json and "
                                   "ROOT/synth.json. Deterministic by --seed.")
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--classes", type=int, default=6, help="number of object classes (4-8)")
    s.add_argument("--image-size", type=int, default=128, help="frame side in pixels")
    s.add_argument("--scale", type=float, default=1.0, help="multiply every split size by this factor")
    s.set_defaults(fn=cmd_synth)
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
                       description="Decodes every frame (PIL, all pixels) and WAV (the reader the methods use) of "
                                   "a split, or of every clip under ROOT, in parallel. Writes the bad ids with their "
                                   "reasons to ROOT/check_<NAME>.txt (NAME: the split, or 'all'), prints a summary "
                                   "and exits with status 1 if any clip is bad.")
    s.add_argument("root", help="dataset root in the standard layout")
    s.add_argument("--split", help="split name (ROOT/splits/NAME.txt) or a .txt id list (default: every clip)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes")
    s.set_defaults(fn=cmd_check)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    C.run_cli(main)
