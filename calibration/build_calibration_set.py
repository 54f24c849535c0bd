"""Build qopt's default calibration sample: random excerpts of WikiText-2 train text and public-domain prose.

Usage (writes qopt/data/calibration/calibration_sample.txt and its ATTRIBUTION.md):
    python calibration/build_calibration_set.py --data ../shared/data --out qopt/data/calibration

The WikiText-2 *train* text only (never the test split, which qopt evaluates on). Excerpts start at a line
boundary, are about `--chars` characters long and are drawn with a fixed seed, so the file is reproducible.
`qopt.calibration.calibration_windows` then cuts random token windows from it; a larger text given with
`qopt quantize --calibration-data FILE` takes its place for models whose context needs more.
"""
from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

WIKITEXT_TRAIN = "wikitext-2-raw/wiki.train.raw.head-partial"
PROSE = {  # file -> (title, author)
    "pretrain_prose/pg11_alice_in_wonderland.txt": ("Alice's Adventures in Wonderland", "Lewis Carroll"),
    "pretrain_prose/pg1342_pride_and_prejudice.txt": ("Pride and Prejudice", "Jane Austen"),
    "pretrain_prose/pg1661_adventures_of_sherlock_holmes.txt": ("The Adventures of Sherlock Holmes",
                                                                 "Arthur Conan Doyle"),
    "pretrain_prose/pg2701_moby_dick.txt": ("Moby Dick", "Herman Melville"),
    "pretrain_prose/pg84_frankenstein.txt": ("Frankenstein", "Mary Shelley"),
    "pretrain_prose/tinyshakespeare_input.txt": ("Tiny Shakespeare (plays)", "William Shakespeare"),
}


def wikitext_rows(text: str) -> str:
    """Rows joined with blank lines as the HF dataset does, so calibration text looks like evaluation text."""
    rows = ["" if line.strip() == "" else line for line in text.splitlines(keepends=True)]
    return "\n\n".join(rows)


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's START and END markers (the licence boilerplate is not prose)."""
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start != -1:
        text = text[text.index("\n", start) + 1:end if end != -1 else None]
    return text.strip()


def excerpts(text: str, count: int, chars: int, rng: random.Random) -> list[str]:
    """`count` excerpts of about `chars` characters, each starting and ending at a line boundary."""
    out = []
    for _ in range(count):
        start = rng.randrange(0, max(1, len(text) - chars))
        start = text.find("\n", start) + 1 if start else 0
        end = text.find("\n", start + chars)
        out.append(text[start:end if end != -1 else None].strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("qopt/data/calibration"))
    ap.add_argument("--excerpts", type=int, default=128, help="total number of excerpts")
    ap.add_argument("--chars", type=int, default=2000, help="characters per excerpt (about 450 tokens)")
    ap.add_argument("--wikitext-share", type=float, default=0.5, help="fraction of excerpts from WikiText-2 train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    n_wiki = round(args.excerpts * args.wikitext_share)
    per_book = (args.excerpts - n_wiki) // len(PROSE)
    parts = excerpts(wikitext_rows((args.data / WIKITEXT_TRAIN).read_text(encoding="utf-8")), n_wiki, args.chars, rng)
    for name in PROSE:
        parts += excerpts(gutenberg_body((args.data / name).read_text(encoding="utf-8")), per_book, args.chars, rng)
    rng.shuffle(parts)
    text = "\n\n".join(parts) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    sample = args.out / "calibration_sample.txt"
    sample.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    books = "\n".join(f"  - *{title}* by {author} (`{Path(name).name}`)"
                      for name, (title, author) in PROSE.items())
    (args.out / "ATTRIBUTION.md").write_text(f"""# Calibration sample

`calibration_sample.txt` ({len(text.encode('utf-8')):,} bytes, sha256 {digest})
holds {len(parts)} excerpts of about {args.chars} characters, shuffled and separated by blank lines, built by
`python calibration/build_calibration_set.py --excerpts {args.excerpts} --chars {args.chars} --wikitext-share {args.wikitext_share} --seed {args.seed}`.
qopt uses it only to calibrate quantization (`qopt quantize --method calibrated`), never for evaluation.

- {n_wiki} excerpts from the **train** split of WikiText-2 (raw) (first 3,279 lines), by Stephen Merity,
  Caiming Xiong, James Bradbury and Richard Socher, "Pointer Sentinel Mixture Models" (2016), built from
  Wikipedia articles. License: Creative Commons Attribution-ShareAlike 3.0 (CC BY-SA 3.0),
  https://creativecommons.org/licenses/by-sa/3.0/. The excerpts are unchanged except that rows are joined
  with blank lines as in the Hugging Face dataset. The sample as a whole is shared under CC BY-SA 3.0.
- {per_book} excerpts from each of these works, public domain in the USA (Project Gutenberg texts without
  Project Gutenberg's licence header and footer; the Shakespeare text is Andrej Karpathy's tinyshakespeare
  compilation of the plays):
{books}
""", encoding="utf-8")
    print(f"wrote {sample} ({len(text.encode('utf-8')):,} bytes, {len(parts)} excerpts)")


if __name__ == "__main__":
    main()
