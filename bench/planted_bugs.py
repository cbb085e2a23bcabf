"""Planted bugs: each bug a review planted (issue 6) must make at least one test fail.

    .venv/bin/python bench/planted_bugs.py [--only NAME ...]

For every entry, the script copies the tracked tree to a scratch folder, applies the one-line
change, runs the named tests there and expects pytest to fail. It prints one line per bug and
exits non-zero if any bug survives (or no longer applies: the code moved, update the entry).
Not part of CI: it reruns slices of the suite once per bug.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = [
    Bug("site never reloads its personal tensors", "client/app.py",
        "loaded = {**state.personal, **received}",
        "loaded = {**received}",
        ("tests/test_state.py",)),
    Bug("state written in place, not temp + rename", "client/state.py",
        'tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")', "tmp = self.path",
        ("tests/test_state.py",)),
    Bug("server.min_reply_fraction ignored", "strategies/base.py",
        "needed = math.ceil(self.cfg.server.min_reply_fraction * max(len(stats.sent) - len(stats.declined), 1))",
        "needed = 1",
        ("tests/test_robustness.py",)),
    Bug("server's check of reply tensor names removed", "strategies/replies.py",
        "if names != expected:", "if False:",
        ("tests/test_robustness.py",)),
    Bug("DualFed: shared-head loss back-propagates into the encoder", "client/methods/dualfed.py",
        "return F.cross_entropy(m.personal_head(z_tilde), y) + lam * con",
        "return F.cross_entropy(m.personal_head(z_tilde), y) + lam * con"
        " + F.cross_entropy(m.shared_head(m.encoder(x)), y)",
        ("tests/test_dualfed.py",)),
    Bug("DualFed: SupCon removed from stage A", "client/methods/dualfed.py",
        "return F.cross_entropy(m.personal_head(z_tilde), y) + lam * con",
        "return F.cross_entropy(m.personal_head(z_tilde), y)",
        ("tests/test_dualfed.py",)),
    Bug("FedHB: precision never updated by the server", "strategies/fedhb.py",
        "if h.fixed_precision is None:", "if False:",
        ("tests/test_fedhb.py",)),
    Bug("FedHB: sites ignore the precision they receive", "client/methods/fedhb.py",
        "out[name] = (sj.received[name].detach().to(p.device, p.dtype), w / n)",
        "out[name] = (sj.received[name].detach().to(p.device, p.dtype), 0 * w)",
        ("tests/test_fedhb.py",)),
    Bug("server never updates the global model", "strategies/base.py",
        "        self.aggregate(updates)\n", "        pass\n",
        ("tests/test_convergence.py",)),
    Bug("report's 'last round' and 'last 5' columns swapped", "server/report.py",
        "for k, a, b in trs)", "for k, b, a in trs)",
        ("tests/test_report.py",)),
    Bug("FedRep's head stage moves the shared BN statistics", "client/methods/fedrep.py",
        'tag=f"{tag}:head", eval_modules=body_modules(model))', 'tag=f"{tag}:head")',
        ("tests/test_peer_baselines.py",)),
    Bug("unseen sites skip their method's adaptation", "client/app.py",
        'if info.role == "unseen" and epochs > 0:', "if False:",
        ("tests/test_peer_baselines.py",)),
]


def tracked_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="substrings of bug names to run")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args(argv)
    lines = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    bugs = [b for b in BUGS if not args.only or any(o in b.name for o in args.only)]
    survived = 0
    out("| planted bug | file | tests run | result |\n|---|---|---|---|")
    for bug in bugs:
        with tempfile.TemporaryDirectory(prefix="kumiki-plant-") as tmp:
            tree = Path(tmp)
            tracked_copy(tree)
            target = tree / bug.path
            text = target.read_text()
            if text.count(bug.old) != 1:
                out(f"| {bug.name} | {bug.path} | – | **does not apply** (the code moved; update the entry) |")
                survived += 1
                continue
            target.write_text(text.replace(bug.old, bug.new))
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
                               cwd=tree, capture_output=True, text=True)
            failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
            verdict = (f"caught: `{failed[0].split('::')[-1]}` fails" if r.returncode == 1 and failed
                       else f"**survived** (pytest exit {r.returncode})")
            survived += r.returncode != 1
            out(f"| {bug.name} | `{bug.path}` | {', '.join(bug.tests)} | {verdict} ({time.perf_counter() - t0:.0f} s) |")
    if args.write:
        sys.path.insert(0, str(ROOT))
        from bench.conformance import _write_between

        stamp = (f"Generated by `bench/planted_bugs.py` on {time.strftime('%Y-%m-%d')}: each bug applied to a copy of "
                 "the tree, the named test files run with `-x`; `caught` names the first failing test.\n\n")
        _write_between(ROOT / "bench" / "RESULTS.md", stamp + "\n".join(lines), tag="planted")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
