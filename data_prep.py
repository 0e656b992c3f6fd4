"""data_prep.py - turn data into the standard layout (see common.py's docstring and the README).

    python data_prep.py synth --out ROOT                 the built-in synthetic benchmark
    python data_prep.py split LIST --name NAME --root ROOT    any id list (*.txt / *.csv) as ROOT/splits/NAME.txt

Run `python data_prep.py SUBCOMMAND --help` for what each one reads and writes.
"""
import argparse
import sys
from pathlib import Path

import common as C


def cmd_synth(a):
    sizes = dict(C.SYNTH_DEFAULTS["sizes"])
    if a.scale != 1.0:
        sizes = {k: max(4, int(round(v * a.scale))) for k, v in sizes.items()}
    C.make_synthetic(a.out, seed=a.seed, n_classes=a.classes, image_size=a.image_size, sizes=sizes)


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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
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
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    try:
        main()
    except C.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
