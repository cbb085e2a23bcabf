"""Site compute (issue 13 part 4): Kumiki's training loop against a plain PyTorch loop, and what a message
costs beyond its SGD steps.

    .venv/bin/python bench/site_compute.py --mode quick [--write]   # ~2 min
    .venv/bin/python bench/site_compute.py --mode full  [--write]   # ~10 min

1. **Per step**: one pilot site's training split (``deploy/pilot.toml``: Fashion-MNIST, 480 training images),
   the pilot model (CNN-S, hidden 128) and a ~1M-parameter one (the same CNN, hidden 320; full mode), the
   pilot's SGD settings. ``Trainer.fit`` (the one loop: seeded batches, the non-finite-loss guard, metrics)
   against the loop a PyTorch tutorial writes (randperm, slice, zero_grad, backward, step), on the same data,
   the same initial weights and the same number of torch threads, interleaved, several repeats; the median
   per step of each. Goal: Kumiki within 10 % of the plain loop.
2. **Threads**: two site processes training at once (as two sites of the local engine on one machine), each
   with torch's default threads (every core) against each with ``client/threads.py``'s share (cores // 2).
3. **Per message, beyond SGD**: the first ``torch.optim`` optimizer of a process (it imports ``torch._dynamo``)
   with and without the ClientApp's pre-import; building the model with its seeded random init against the
   skeleton filled with the tensors the message brings anyway; the finiteness checks of every tensor in and
   out, per-element against one sum per tensor.

``--write`` puts the section between the ``site-compute`` markers of bench/RESULTS.md and refreshes the docs'
copies of it (``docs/gen.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import load, machine, median, stamp, verdict, publish  # noqa: E402

GOAL = 1.10  # Kumiki's per-step time / the plain loop's


def pilot_site(hidden: int):
    """(x_train, y_train, TrainSection, ModelSpec) of the pilot's first site, with a CNN of ``hidden`` units."""
    from kumiki.config import load_config
    from kumiki.data.sites import load_site
    from kumiki.data.prepare import materialize
    from server.federation import model_spec

    cfg = load_config(str(ROOT / "deploy" / "pilot.toml"), [f"model.hidden={hidden}"])
    root = Path(tempfile.mkdtemp(prefix="kumiki-bench-site-"))
    folder = materialize(cfg, root)[0]
    site = load_site(folder)
    return site.x_train, site.y_train, cfg.train, model_spec(cfg)


def kumiki_steps(model, x, y, train_cfg, epochs: int) -> tuple[float, int]:
    from client.loop import Trainer

    trainer = Trainer(x, y, train_cfg, seed="bench")
    t0 = time.perf_counter()
    trainer.fit(model, model.parameters(), epochs=epochs)
    return time.perf_counter() - t0, trainer.steps


def plain_steps(model, x, y, train_cfg, epochs: int) -> tuple[float, int]:
    """The textbook loop on the same tensors and optimizer settings."""
    import torch
    from torch.nn import functional as F

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum,
                          weight_decay=train_cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    b, steps = train_cfg.batch_size, 0
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt), b):
            idx = perm[i:i + b]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            steps += 1
    return time.perf_counter() - t0, steps


def per_step(hidden: int, threads: int, repeats: int, epochs: int) -> dict:
    import torch

    from models import build_model

    torch.set_num_threads(threads)
    x, y, train_cfg, spec = pilot_site(hidden)
    base = build_model(spec)
    params = sum(p.numel() for p in base.parameters())
    times: dict[str, list[float]] = {"kumiki": [], "plain": []}
    for arm, fn in (("kumiki", kumiki_steps), ("plain", plain_steps)):  # warm-up: allocator, first optimizer
        fn(copy.deepcopy(base), x, y, train_cfg, 1)
    for r in range(repeats):
        order = (("kumiki", kumiki_steps), ("plain", plain_steps))
        for arm, fn in order if r % 2 == 0 else order[::-1]:
            sec, steps = fn(copy.deepcopy(base), x, y, train_cfg, epochs)
            times[arm].append(sec / steps)
    k, p = median(times["kumiki"]), median(times["plain"])
    return {"hidden": hidden, "params": params, "threads": threads, "kumiki_ms": 1e3 * k, "plain_ms": 1e3 * p,
            "ratio": k / p, "train_examples": len(y), "batch": train_cfg.batch_size}


def concurrent(hidden: int, procs: int, threads: int | None, epochs: int) -> float:
    """Median per-step ms of ``procs`` site processes training at once with ``threads`` each (None: torch's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import sys, json; sys.path.insert(0, %r); import torch\n"
            "from bench.site_compute import pilot_site, kumiki_steps\nfrom models import build_model\n"
            "t = %r\nif t: torch.set_num_threads(t)\n"
            "x, y, c, s = pilot_site(%d); m = build_model(s); kumiki_steps(m, x, y, c, 1)\n"
            "print('GO', flush=True); sys.stdin.readline()\n"
            "sec, n = kumiki_steps(m, x, y, c, %d); print(json.dumps(sec / n))") % (str(ROOT), threads, hidden, epochs)
    ps = [subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True) for _ in range(procs)]
    for p in ps:  # all loaded and warmed up, then all start together
        while p.stdout.readline().strip() != "GO":
            pass
    for p in ps:
        p.stdin.write("\n")
        p.stdin.flush()
    out = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in ps]
    return 1e3 * median(out)


def first_optimizer() -> dict:
    """Seconds the first optimizer of a fresh process costs, without and with the ClientApp's pre-import."""
    probe = ("import sys, time; sys.path.insert(0, %r); import torch\n%s\n"
             "m = torch.nn.Linear(4, 4); t = time.perf_counter(); torch.optim.SGD(m.parameters(), lr=0.1)\n"
             "print(time.perf_counter() - t)")
    out = {}
    for name, pre in (("without", ""), ("with", "import client.loop")):
        r = subprocess.run([sys.executable, "-c", probe % (str(ROOT), pre)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        out[name] = float(r.stdout.strip().splitlines()[-1])
    return out


def per_message_costs(hidden: int, repeats: int = 30) -> dict:
    """Milliseconds (minimum over repeats): model build with random init vs skeleton + fill; finiteness checks."""
    import torch

    from client.app import non_finite
    from models import build_model, fill

    from kumiki.config import load_config
    from server.federation import model_spec

    spec = model_spec(load_config(str(ROOT / "deploy" / "pilot.toml"), [f"model.hidden={hidden}"]))
    tensors = {k: v.clone() for k, v in build_model(spec).state_dict().items()}

    def seeded():
        m = build_model(spec)
        m.load_state_dict(tensors)

    def skeleton():
        assert fill(build_model(spec, init=False), tensors) is not None

    def per_element():
        for v in tensors.values():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise AssertionError

    def one_sum():
        assert non_finite(tensors) is None

    res: dict[str, list[float]] = {k: [] for k in ("seeded", "skeleton", "per_element", "one_sum")}
    fns = {"seeded": seeded, "skeleton": skeleton, "per_element": per_element, "one_sum": one_sum}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            res[k].append(time.perf_counter() - t0)
    return {k: 1e3 * min(v) for k, v in res.items()} | {"tensors": len(tensors)}


def render(cmd: str, rows: list[dict], conc: list[dict], opt: dict, costs: list[dict], load0: str, load1: str,
           threads_note: str) -> str:
    lines = [f"{stamp(cmd)} Machine: {machine()}. Load average {load0} at the start, {load1} at the end "
             "(4 other engineers at work on the same 2 cores: read the ratios, not the seconds).", "",
             "**Per SGD step**, one pilot site (Fashion-MNIST, 480 training images, batch 32, the pilot's SGD), the "
             "same data, initial weights and threads; median of interleaved repeats:", "",
             "| model | parameters | threads | Kumiki `Trainer.fit` ms/step | plain PyTorch loop ms/step | ratio | goal ≤ 1.10 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| CNN hidden {r['hidden']} | {r['params']:,} | {r['threads']} | {r['kumiki_ms']:.1f} | "
                     f"{r['plain_ms']:.1f} | {r['ratio']:.2f} | {verdict(r['ratio'] <= GOAL)} |")
    single = [r for r in rows if r["threads"] == 1] or rows
    worst = max(r["ratio"] for r in single)
    lines += ["", f"- Goal \"Kumiki's loop within 10 % of a plain PyTorch loop\": {verdict(worst <= GOAL)} (worst "
                  f"ratio {worst:.2f}, one thread)."]
    if any(r["threads"] > 1 for r in rows):
        lines.append("- Rows with more than one thread wait for cores the other engineers' jobs hold (see the load "
                     "average): their seconds, and so their ratios, are mostly that wait. The thread rule gives a "
                     "site every core only when nothing else runs on the machine; a shared machine sets "
                     "`threads` (or `OMP_NUM_THREADS`) explicitly.")
    lines.append("")
    if conc:
        lines += ["**Threads**: two site processes training the pilot model at once on this machine "
                  f"({threads_note}), median ms per step:", "",
                  "| threads per site process | ms/step | × the rule |", "|---|---|---|"]
        rule = next(c for c in conc if c["rule"])["ms"]
        for c in conc:
            lines.append(f"| {c['label']} | {c['ms']:.1f} | {c['ms'] / rule:.2f} |")
        lines.append("")
    lines += ["**Per message, beyond SGD** (before → now):", "",
              f"- first `torch.optim` optimizer of a site process: {opt['without']:.2f} s inside the first message "
              f"(it imports `torch._dynamo`) → {1e3 * opt['with']:.1f} ms (the ClientApp imports it when it loads; "
              "warm SuperExecs have it preloaded);"]
    for c in costs:
        lines.append(f"- CNN hidden {c['hidden']} ({c['tensors']} tensors): model with its seeded random init "
                     f"{c['seeded']:.2f} ms → skeleton filled with the message's tensors {c['skeleton']:.2f} ms; "
                     f"finiteness checks per element {c['per_element']:.2f} ms → one sum per tensor "
                     f"{c['one_sum']:.2f} ms (each way, in and out).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    a = ap.parse_args(argv)
    os.environ.pop("OMP_NUM_THREADS", None)
    from client.threads import site_threads, usable_cores

    cores = usable_cores()
    full = a.mode == "full"
    load0 = load()
    hiddens = (128, 320) if full else (128,)
    threads = sorted({1, cores}) if full else [1]
    rows = []
    for h in hiddens:
        for t in threads:
            rows.append(per_step(h, t, repeats=7 if full else 3, epochs=2 if full else 1))
            print(json.dumps(rows[-1]), flush=True)
    procs = 2
    rule = site_threads({"local-sites": procs}, env={})
    conc = [{"label": f"the rule: {rule} (usable cores {cores} // {procs} sites)", "rule": True,
             "ms": concurrent(128, procs, rule, 2 if full else 1)},
            {"label": "torch's default (every core in each process)", "rule": False,
             "ms": concurrent(128, procs, None, 2 if full else 1)}]
    print(json.dumps(conc), flush=True)
    opt = first_optimizer()
    costs = [per_message_costs(h) | {"hidden": h} for h in hiddens]
    print(json.dumps({"optimizer": opt, "costs": costs}), flush=True)
    text = render(f"bench/site_compute.py --mode {a.mode}", rows, conc, opt, costs, load0, load(),
                  f"{cores} usable cores")
    print("\n" + text)
    if a.write:
        publish("site-compute", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
