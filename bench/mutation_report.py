"""Summarize a finished ``mutmut run`` (``make mutation``) into bench/RESULTS.md.

    .venv/bin/python bench/mutation_report.py [--write]

Prints the score (killed / checked) per file and every surviving mutant as its one-line change,
grouped by function, with the reason it survives where ``REASONS`` gives one (keyed by function,
then by a substring of the mutated line). Survivors without a reason are listed as "to examine".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = str(Path(sys.executable).with_name("mutmut"))

#: Why a surviving mutant is equivalent (or accepted): function-name substring -> [(line substring, reason)].
#: A line substring of "" matches every mutant of that function.
SEED = "seed-stream label: another name gives another, equally valid, deterministic batch order"
DEVICE = "device placement: equivalent on a single device (CPU here and in CI); a CUDA run would expose it"
PRECISION = ("numeric precision: float64 vs the default dtype; results agree to the tests' tolerances (float32 "
             "sums of a few sites)")
SYMMETRIC = ("the positive relation is symmetric and class-wise, so every b in P(a) has |P(b)| = |P(a)|: "
             "subtracting the column's log-sum-exp instead of the row's gives the same mean (a hand-checked identity)")
FLOAT32 = "dtype cast: the message's arrays and the site's parameters are both float32 here"
REASONS: dict[str, list[tuple[str, str]]] = {
    "": [
        ("tag=", SEED), ('f"{tag}', SEED), ('f"r{', SEED), ('f"p{', SEED), ('f"v{', SEED), ('f"ft{', SEED),
        ('f"new', SEED), ('batches(', SEED), ("epochs, None)", SEED), ("model, None)", SEED),
        ("device=", DEVICE), (".to(None", DEVICE), (".to(p.dtype", DEVICE), ("model.to(None)", DEVICE),
        ("dtype=None", PRECISION), ("astype(None)", PRECISION), ("dtype=np.float64) →", PRECISION),
        ("asarray(mi[k], )", PRECISION), ("asarray(weights, )", PRECISION), ("zeros(first.shape, )", PRECISION),
        ("else mu0, )", PRECISION), ("h.mu0, )", PRECISION), ("start, )", PRECISION),
    ],
    "as_dict": [("", "only feeds a SplitError's message; renaming its keys changes no behaviour")],
    "fingerprint": [("", "a hash's input layout: any stable change is equivalent (fingerprints are only compared "
                         "with fingerprints made by the same code)")],
    "weights": [("2.0", "uniform weights of any constant are the same mean (weights are normalized)")],
    "uniform_mean": [("2.0", "uniform weights of any constant are the same mean (weights are normalized)")],
    "niw_diag_update": [("ms[1]", "every update carries the same tensor names, so iterating any one's keys is the same")],
    "server_state": [("extra_arrays(", "FedHB's extra_arrays ignores its arguments (the precision is the same for all)")],
    "clip_to_median_norm": [("norm < limit", "at norm == limit the scale is limit / norm = 1 either way"),
                            ("norm == 1", "norm == 0 already satisfies norm <= limit (limit >= 0): the term is redundant")],
    "aggregate_shared": [("(others) or True", "with no non-coordinate tensors the mean of empty dicts is {} either way")],
    "FedHBǁ__init__": [("build_model(job.model, )", "FedHB uses the plain model, the builder's default variant")],
    "_admit": [("timeout=None", "the in-process grid answers at once; the timeout only bounds a deployment wait "
                                "(checked by the local-engine tests, outside the fast selection)"),
               ("send_and_receive(msgs, )", "as above: the timeout only bounds a deployment wait"),
               ("replace(self.job, )", "the profile query ignores the round number")],
    "discover": [("len(ids) <= expected", "only decides a log line"),
                 ("timeout, None", "as for _admit: the timeout only bounds a deployment wait"),
                 ("ids, None, live", "as for _admit: the timeout only bounds a deployment wait")],
    "refresh": [("min(3", "the timeout only bounds a deployment wait"), ("_discovery_timeout", "the timeout only "
                "bounds a deployment wait"), ("getattr(None", "the timeout only bounds a deployment wait"),
                ("live, )", "the profile query ignores the round number")],
    "parse_profile": [('"XXXX")', "a site always sends its group; the default only matters for a malformed profile, "
                                  "which then fails the string check anyway"),
                      ('"group", None)', "as above"), ('"group", )', "as above")],
    "supcon_loss": [("normalize(features, )", "F.normalize's default dim is 1"),
                    ("keepdim=False", SYMMETRIC), ("dim=1, )", SYMMETRIC),
                    ('"-INF"', "float('-INF') is float('-inf')")],
    "DualFedObjectiveǁadapt_unseen": [("if model is sj.model else model", "DualFed's projector always keeps BatchNorm "
                                       "statistics at home, so global_model already returns a copy on an unseen site; "
                                       "the line guards a future projector without BN")],
    "DualFedObjectiveǁfit": [("max(supcon[1], 2)", "stage A always sees at least 2 examples (batches of 1 are skipped)")],
    "fit_shared_head": [("split(1025)", "chunk size of a no-grad feature pass: any size gives the same features"),
                        ("parameters(), epochs=epochs,", "the loop's default loss is the same cross-entropy")],
    "FedHBObjectiveǁ_pull": [("in extra or name in", "the server sends a precision for exactly the tensors it sends "
                                                    "(one contract), so the two conditions hold together"),
                             ("p.device, None)", FLOAT32), ("p.device, )", FLOAT32)],
    "FedHBObjectiveǁfit": [("strict=None", "None is falsy: load_state_dict treats it as strict=False")],
    "FedHBObjectiveǁsolve": [("(pull) or True", "with no precision to pull towards the implicit step changes nothing")],
    "LocalObjectiveǁadapt_unseen": [("build_model(sj.job.model, )", "Local uses the plain model, the default variant")],
    "fresh_head_on_frozen_body": [("build_model(sj.job.model, )", "FedPer/FedRep use the plain model, the default "
                                                                   "variant")],
}


def results() -> list[tuple[str, str]]:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        if ":" in line:
            name, _, status = line.strip().rpartition(": ")
            rows.append((name.strip(), status.strip()))
    return rows


def change(name: str) -> str:
    """The mutated line(s) of one mutant, as '-old / +new'."""
    diff = subprocess.run([MUTMUT, "show", name], cwd=ROOT, capture_output=True, text=True).stdout
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return f"`{' '.join(minus)[:110]}` → `{' '.join(plus)[:110]}`"


def reason(func: str, line: str) -> str | None:
    for key in sorted(REASONS, key=len, reverse=True):
        if key in func:
            for needle, why in REASONS[key]:
                if needle in line:
                    return why
    for needle, why in REASONS[""]:
        if needle in line:
            return why
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    rows = results()
    status = Counter(s for _, s in rows)
    checked = [r for r in rows if r[1] not in ("not checked", "no tests")]
    killed = [r for r in checked if r[1] in ("killed", "timeout", "segfault", "caught by type check")]
    per_file: dict[str, Counter] = defaultdict(Counter)
    for name, st in checked:
        per_file[name.split(".x")[0]][st == "survived"] += 1
    lines = [f"Generated by `bench/mutation_report.py` on {time.strftime('%Y-%m-%d')} from `make mutation` "
             f"(mutmut 3.8.1, the fast tests listed in pyproject.toml).", "",
             f"**In the cache now: {len(killed)} of {len(checked)} checked mutants killed ({100 * len(killed) / max(len(checked), 1):.1f}%)**; "
             + ", ".join(f"{n} {s}" for s, n in sorted(status.items())), "",
             "| module | mutants | survived |", "|---|---|---|"]
    for mod in sorted(per_file):
        c = per_file[mod]
        lines.append(f"| `{mod}` | {c[True] + c[False]} | {c[True]} |")
    survivors = [n for n, s in rows if s == "survived"]
    groups: dict[str, list[str]] = defaultdict(list)
    for n in survivors:
        groups[n.rsplit("__mutmut_", 1)[0]].append(n)
    lines += ["", "### Surviving mutants", "",
              "Each with why it is equivalent; none is left unexplained (the script says `to examine` otherwise).", ""]
    unexplained = 0
    for func in sorted(groups):
        lines.append(f"- `{func.replace('xǁ', '').replace('ǁ', '.')}`")
        for n in groups[func]:
            ch = change(n)
            why = reason(func, ch)
            unexplained += why is None
            lines.append(f"  - {ch}: {why or '**to examine**'}")
    text = "\n".join(lines)
    print(text)
    if args.write:
        sys.path.insert(0, str(ROOT))
        from bench.conformance import _write_between

        _write_between(ROOT / "bench" / "RESULTS.md", text, tag="mutation")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
