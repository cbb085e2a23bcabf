"""One array per message (issue 26 item 1): objects, bytes and seconds of one hop, per-tensor records (before)
against one packed array (after), in the same process, alternating.

    PYTHONPATH=. .venv/bin/python bench/hops.py [--mode quick|full] [--write]

What a hop costs in Flower 1.41: the sender deflates every object of the message (the message, its records,
each ``Array`` and each ``Array``'s chunks) and pushes each one with its own request; the receiver pulls each
one with its own request and inflates the message from them (``flwr.supercore.inflatable``). A SuperNode hop
and a SuperLink hop both do this, so objects per message are requests per hop (one push and one pull each).
Here both encodings of the same model go through exactly that path without the network: Kumiki's encoding
(``kumiki.contract.to_record`` per tensor, before; ``kumiki.packing.put``, after), Flower's deflate of every
object, its ``inflate_object_from_contents``, and the receiver's decode and checks (``check_arrays`` before,
``check_packed`` after). Timings are medians of alternating repetitions (before, after, after, before, ...)
in one process, so the ratio holds on a loaded machine even where the seconds do not.

Models: the pilot CNN-S (0.42M parameters), the 1M CNN of ``bench/overhead.py`` (hidden 320) and the default
language model (width 256, 4 blocks, context 128: WorldLM on fortunes), each whole model in float32 and in
float16 (``server.transport_dtype``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import load, machine, publish, stamp  # noqa: E402


def models() -> list[tuple[str, dict]]:
    from bench.common import pilot_config
    from kumiki.config import validate
    from models import build_model
    from server.federation import model_spec

    out = []
    for name, sets in (("pilot CNN-S", []), ("pilot-1m CNN", ["model.hidden=320"])):
        cfg = pilot_config(sets)
        out.append((name, build_model(model_spec(cfg), cfg.method).state_dict()))
    cfg = validate({"run": {"name": "lm", "rounds": 1}, "method": {"name": "fedavg"},
                    "data": {"dataset": "markov", "sites": 2}})
    out.append(("fortunes LM (256 x 4)", build_model(model_spec(cfg), cfg.method).state_dict()))
    return out


def hop(arrays: dict, packed: bool) -> tuple[float, int, int]:
    """One hop: encode, deflate every object, inflate, decode and check; (seconds, objects, bytes)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from kumiki import contract as C, packing
    from strategies.replies import check_arrays, check_packed

    t0 = time.perf_counter()
    content = RecordDict({C.CONFIG: ConfigRecord({C.ROUND: 1})})
    if packed:
        packing.put(content, arrays)
    else:
        content[C.ARRAYS] = C.to_record(arrays)
    msg = Message(content, dst_node_id=2, message_type="train")
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    size = sum(len(c) for c in contents.values())
    got = inflate_object_from_contents(msg.object_id, dict(contents))
    wire = {k: v.dtype for k, v in arrays.items()}
    if packed:
        out = check_packed(got.content, arrays, list(arrays), wire=wire)
    else:
        out = check_arrays(got.content[C.ARRAYS], arrays, list(arrays), wire=wire)
    assert len(out) == len(arrays)
    return time.perf_counter() - t0, len(contents), size


def measure(name: str, state: dict, dtype: str, reps: int) -> dict:
    import numpy as np

    arrays = {k: v.numpy().astype(np.float16 if dtype == "float16" and v.is_floating_point() else v.numpy().dtype)
              for k, v in state.items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    facts = {}
    for i in range(reps):
        for packed in ((False, True) if i % 2 == 0 else (True, False)):
            s, n, b = hop(arrays, packed)
            times[packed].append(s)
            facts[packed] = (n, b)
    before, after = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "dtype": dtype, "tensors": len(arrays), "params": sum(a.size for a in arrays.values()),
            "objects": (facts[False][0], facts[True][0]), "bytes": (facts[False][1], facts[True][1]),
            "s": (before, after)}


def render(mode: str, rows: list[dict], loads: tuple[str, str]) -> str:
    lines = [f"{stamp(f'bench/hops.py --mode {mode}')} Machine: {machine()}. Load average {loads[0]} at the start, "
             f"{loads[1]} at the end (a shared machine: read the ratios, measured alternating in one process).", "",
             "| model | dtype | tensors | objects per message (= push + pull requests per hop), before → after | "
             "bytes per message, before → after | ms per hop (encode, deflate, inflate, decode + checks), before "
             "→ after | after / before |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        (ob, oa), (bb, ba), (sb, sa) = r["objects"], r["bytes"], r["s"]
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['dtype']} | {r['tensors']} | {ob} → {oa} | "
                     f"{bb:,} → {ba:,} ({100 * (ba / bb - 1):+.1f} %) | {1e3 * sb:.1f} → {1e3 * sa:.1f} | "
                     f"{sa / sb:.2f} |")
    return "\n".join(lines)


E2E = ("import json, sys; from pathlib import Path; sys.path.insert(0, '.'); from bench.overhead import measure; "
       "print('RESULT ' + json.dumps(measure({w!r}, {s}, 'local', {r}, Path({out!r}))))")


def e2e(base: Path, workload: str, sites: int, rounds: int, reps: int, out: Path) -> list[dict]:
    """Real processes (``--engine local``: SuperLink, SuperNodes, TLS): ``bench/overhead.py``'s measure, run in
    the tree at ``base`` (before: an unpacked checkout, e.g. ``git archive <commit>``) and in this one (after),
    alternating (before, after, after, before, ...). Steady round = the median round after the first."""
    import json
    import os
    import subprocess

    rows = []
    for i in range(reps):
        for tree in ((base, ROOT) if i % 2 == 0 else (ROOT, base)):
            code = E2E.format(w=workload, s=sites, r=rounds, out=str(out / ("before" if tree == base else "after")))
            done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)}, timeout=1800)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the run in {tree} failed")
            rows.append({"tree": "before" if tree == base else "after", **json.loads(line[7:])})
            print(rows[-1], flush=True)
    return rows


def render_e2e(rows: list[dict], workload: str, sites: int, rounds: int, loads: tuple[str, str]) -> str:
    def med(tree, key):
        return statistics.median(r[key] for r in rows if r["tree"] == tree)

    lines = ["", f"End to end (`bench/hops.py --e2e BASE`): `--engine local` (real SuperLink and SuperNodes, TLS), "
                 f"`bench/overhead.py`'s {workload} workload, {sites} sites, {rounds} rounds, "
                 f"{len(rows) // 2} runs each, alternating; before = the tree without packing. Load average "
                 f"{loads[0]} at the start, {loads[1]} at the end.", "",
             "| | steady s/round | sites' compute s | overhead | round 1 s | status |", "|---|---|---|---|---|---|"]
    for tree in ("before", "after"):
        st = ",".join(sorted({r["status"] for r in rows if r["tree"] == tree}))
        lines.append(f"| {tree} | {med(tree, 'round_s'):.2f} | {med(tree, 'compute_s'):.2f} | "
                     f"{100 * med(tree, 'overhead'):.0f} % | {med(tree, 'round1_s'):.2f} | {st} |")
    lines.append(f"| after / before | {med('after', 'round_s') / med('before', 'round_s'):.2f} | | | "
                 f"{med('after', 'round1_s') / med('before', 'round1_s'):.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md (hops)")
    ap.add_argument("--e2e", type=Path, default=None, metavar="BASE",
                    help="also time --engine local rounds here and in the tree at BASE (before), alternating")
    ap.add_argument("--e2e-sites", type=int, default=3)
    ap.add_argument("--e2e-reps", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a Message needs them outside a run
    reps = 10 if a.mode == "quick" else 40
    load0 = load()
    rows = []
    for name, state in models():
        for dtype in ("float32", "float16"):
            rows.append(measure(name, state, dtype, reps))
            print(rows[-1], flush=True)
    text = render(a.mode, rows, (load0, load()))
    if a.e2e is not None:
        import tempfile

        load1 = load()
        runs = e2e(a.e2e.resolve(), "pilot", a.e2e_sites, 3, a.e2e_reps,
                   Path(tempfile.gettempdir()) / "kumiki-bench" / "hops")
        text += "\n" + render_e2e(runs, "pilot", a.e2e_sites, 3, (load1, load()))
    print("\n" + text)
    if a.write:
        publish("hops", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
