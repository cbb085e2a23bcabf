"""The ``kumiki`` command: validate, run, report, pilot, config-schema."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kumiki.config import ConfigError, KumikiConfig, load_config, run_config_dict, to_json

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Kumiki: personalized federated learning on Flower.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: --set run.rounds=5 (TOML value)")]
PILOT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "pilot.toml"


def _load(config: str, overrides: list[str] | None) -> KumikiConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        err.print(f"[red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None


def _note_method_defaults(cfg: KumikiConfig) -> None:
    if cfg.train_from_method:
        keys = ", ".join(f"train.{k} = {v}" for k, v in cfg.train_from_method.items())
        err.print(f"note: {escape(keys)} from {cfg.method.name}'s paper defaults (set them in \\[train] to override)")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: exit codes of `kumiki run` / `kumiki pilot`
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def _execute(cfg: KumikiConfig, engine: str, verbose: bool, overwrite: bool = False, resume: bool = False,
             exit_on_status: bool = True, insecure: bool = False) -> dict:
    """Run, write the report, and exit with the run's status: 0 ok, 3 incomplete (sites missing), 1 failed."""
    from kumiki.data.sites import SiteDataError
    from kumiki.data.sources import DataUnavailable
    from launch.engines import run
    from launch.rundir import RunDirError

    _logging(verbose)
    _note_method_defaults(cfg)
    err.print(f"[bold]kumiki[/] {cfg.method.name} on {cfg.data.dataset}: {cfg.data.sites} sites"
              f" (+{cfg.data.unseen_sites} unseen), {cfg.run.rounds} rounds, engine {engine} -> {cfg.run_dir()}"
              f"{' (resumed)' if resume else ''}")
    try:
        summary = run(cfg, engine, overwrite=overwrite, resume=resume, insecure=insecure)
    except (SiteDataError, DataUnavailable) as e:
        err.print(f"[red]data error:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_USAGE) from None
    except RunDirError as e:
        err.print(f"[red]run dir:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (stop_on_signals): say so, and where it is recorded
        why = f"stopped by {str(e) or 'SIGINT'}"
        err.print(f"[red]the run was {why}[/]: every process it started was stopped")
        _print_records(cfg)
        raise typer.Exit(signal_exit_code()) from None
    except Exception as e:  # noqa: BLE001 - a failed run is reported as failed, never as done
        err.print(f"[red]the run failed:[/] {type(e).__name__}: {escape(str(e))}")
        _print_records(cfg)
        raise typer.Exit(EXIT_FAILED) from None
    report = cfg.run_dir() / "report.html"  # the round driver writes it at the end of every run
    try:
        if not report.is_file():
            from server.report import render_report

            render_report(cfg.run_dir())
        err.print(f"report: {report}")
    except Exception as e:  # noqa: BLE001 - a report failure must not hide a finished run
        err.print(f"[yellow]report not written: {escape(str(e))}[/]")
    p = summary.get("personalized") or {}
    g = summary.get("global") or {}
    u = summary.get("unseen") or {}

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    status = summary.get("status", "ok")
    line = (f"personalized {f(p.get('mean'))} (bottom10 {f(p.get('bottom10'))}), global {f(g.get('mean'))}, "
            f"unseen {f(u.get('mean'))}; summary: {cfg.run_dir() / 'summary.json'}")
    if status == "ok":
        err.print(f"[green]done[/]: {line}")
        return summary
    part = summary.get("participation") or {}
    err.print(f"[yellow]finished, status {status!r}[/]: {line}\n  sites configured {part.get('configured')}, "
              f"discovered {len(part.get('discovered') or [])}, dropped {len(part.get('dropped') or [])}; "
              f"rounds with missing or rejected sites: {part.get('incomplete_rounds')}")
    if exit_on_status:
        raise typer.Exit(exit_code(summary))
    return summary


def _print_records(cfg: KumikiConfig) -> None:
    """Where a run that did not finish recorded how it ended."""
    summary, report = cfg.run_dir() / "summary.json", cfg.run_dir() / "report.html"
    if summary.is_file():
        try:
            error = json.loads(summary.read_text()).get("error")
        except (OSError, ValueError):
            error = None
        err.print(f"what it recorded (status 'failed'{f': {escape(str(error))}' if error else ''}): {summary}")
    if report.is_file():
        err.print(f"report: {report}")


def exit_code(summary: dict) -> int:
    status = summary.get("status", "ok")
    return EXIT_OK if status == "ok" else EXIT_INCOMPLETE if status == "incomplete" else EXIT_FAILED


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="move an earlier run of this run.name aside first")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="local engine: turn TLS and SuperNode authentication OFF (debugging only; printed loudly)")]


@cli.command()
def validate(config: str, set_: SetOpt = None) -> None:
    """Validate CONFIG (with overrides) and print the resolved config."""
    cfg = _load(config, set_)
    typer.echo(to_json(cfg))
    _note_method_defaults(cfg)


@cli.command("methods")
def methods_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List every method: what it is, its knobs with defaults, and the paper optimizer it brings."""
    from kumiki.registry import catalog

    cat = catalog()
    if as_json:
        typer.echo(json.dumps(cat, indent=2, default=str))
        return
    for m in cat:
        typer.echo(f"{m['name']}: {m['summary']}")
        for k in m["knobs"]:
            shown = "(required)" if k["required"] else _knob_value(k["default"])
            typer.echo(f"    {k['key']:<28} = {shown:<18} {k['meaning']}")
        if m["train_defaults"]:
            td = ", ".join(f"train.{k} = {v}" for k, v in m["train_defaults"].items())
            typer.echo(f"    paper optimizer (used unless [train] sets the key): {td}")
        typer.echo("")


def _knob_value(v) -> str:
    """A default as the config file spells it where that differs from str(): lists as TOML arrays."""
    return json.dumps(list(v)) if isinstance(v, (list, tuple)) else str(v)


@cli.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the config file."""
    typer.echo(json.dumps(KumikiConfig.model_json_schema(), indent=2))


@cli.command("run")
def run_cmd(
    config: str,
    set_: SetOpt = None,
    engine: Annotated[str, typer.Option(help="inprocess (default: no sockets, no Ray), local (real SuperLink + SuperNodes on 127.0.0.1), simulation (Flower/Ray), regions (WorldLM shape (b): a SuperLink per sub-federation)")] = "inprocess",
    verbose: bool = False,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in runs/<name>/ from its last server "
                                                          "checkpoint (same config; run.rounds may grow)")] = False,
    insecure: InsecureOpt = False,
) -> None:
    """Run one federated experiment described by CONFIG (exit 0 ok, 3 sites missing, 1 failed, 2 bad input)."""
    from launch.engines import ENGINES

    if engine not in ENGINES:
        err.print(f"[red]--engine must be one of {', '.join(ENGINES)}[/]")
        raise typer.Exit(2)
    _execute(_load(config, set_), engine, verbose, overwrite, resume, insecure=insecure)


@cli.command("submit")
def submit(
    config: Annotated[str, typer.Argument(help="the Kumiki config, as a path the ServerApp resolves on the server host "
                                               "(e.g. deploy/factories.toml)")],
    connection: Annotated[str, typer.Argument(help="the flwr CLI's SuperLink connection ($FLWR_HOME/config.toml)")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue runs/<name>/ on the server from its last "
                                                          "checkpoint")] = False,
    app: Annotated[str, typer.Option(help="the app directory `flwr run` ships as a FAB")] = ".",
    timeout_s: Annotated[float, typer.Option(help="give up waiting after this many seconds (0: wait)")] = 0,
    certs: Annotated[Optional[str], typer.Option(
        help="the operator's `kumiki certs` folder: present operator.crt to the proxy's Control listener and sign "
             "the app with app-signing.key (default: $KUMIKI_OPERATOR_CERTS; neither: the environment's "
             "KUMIKI_CLIENT_CERT/KEY and KUMIKI_APP_SIGNING_KEY, if any)")] = None,
) -> None:
    """Validate CONFIG, submit it to a deployment with `flwr run`, and exit with the run's real status.

    `flwr run` exits 0 even when the run fails inside the ServerApp; this reads the run's status back
    (`flwr ls --run-id`) and exits 0 only for finished:completed (1 otherwise, 2 bad input). With --set the
    resolved config itself is sent (the server needs no copy of it); --overwrite moves an earlier run of the
    same run.name aside on the server (nothing is deleted), so a rerun under the same name works.
    """
    import re
    import subprocess
    import time

    from launch.engines import local as engine
    from launch.engines.local import _ANSI, _STARTED, FLWR_ENV, toml_str

    if overwrite and resume:
        err.print("[red]--resume continues the run in its run dir and --overwrite moves it aside: choose one[/]")
        raise typer.Exit(EXIT_USAGE)
    cfg = _load(config, set_)  # nothing is submitted when the config is bad
    # the resolved config on one line (a Flower config value holds no newline); the ServerApp reads JSON text
    source = json.dumps(run_config_dict(cfg), separators=(",", ":")) if set_ else config
    run_config = " ".join([f"config={toml_str(source)}", *(["overwrite=true"] if overwrite else []),
                           *(["resume=true"] if resume else [])])
    # through launch/fastpath.py (mode flwr): the operator's client certificate for the proxy, the app signed
    cmd = [*engine.flwr_cli(), "run", app, connection, "--run-config", run_config, "--stream"]
    err.print(f"$ flwr run {app} {connection} --run-config {'<resolved config>' if set_ else run_config} --stream")
    env = {**os.environ, **FLWR_ENV}
    certs = certs or os.environ.get("KUMIKI_OPERATOR_CERTS")
    if certs:
        from launch.certs import CertBundle

        bundle = CertBundle(Path(certs), [])
        missing = [p for p in (bundle.operator_crt, bundle.operator_key, bundle.app_signing_key) if not p.is_file()]
        if missing:
            err.print(f"[red]--certs {certs}: no {', '.join(p.name for p in missing)} (`kumiki certs {certs}` makes them)[/]")
            raise typer.Exit(EXIT_USAGE)
        env = engine.operator_env(env, bundle)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    run_id, deadline = None, (time.monotonic() + timeout_s) if timeout_s > 0 else None
    assert proc.stdout is not None
    import threading

    def pump() -> None:
        nonlocal run_id
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (m := _STARTED.search(_ANSI.sub("", line))):
                run_id = int(m.group(1))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while proc.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)
            err.print(f"[red]gave up after {timeout_s:.0f}s[/]; run {run_id} goes on on the server "
                      f"(`flwr stop {run_id} {connection}` stops it)")
            raise typer.Exit(EXIT_FAILED)
        time.sleep(0.2)
    reader.join(timeout=5)
    if run_id is None:
        err.print(f"[red]flwr run did not start a run[/] (exit {proc.returncode})")
        raise typer.Exit(EXIT_FAILED)
    status = engine._flwr_status(env, run_id, federation=connection)
    for _ in range(30):  # the stream can end a moment before the SuperLink records the run's end
        if not re.match(r"(pending|starting|running)", status):
            break
        time.sleep(1)
        status = engine._flwr_status(env, run_id, federation=connection)
    ok = status == "finished:completed"
    err.print(f"{'[green]' if ok else '[red]'}run {run_id}: {status}[/]"
              + ("" if ok else f" (`flwr log {run_id} {connection}` has the ServerApp's log)"))
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


@cli.command()
def report(run_dir: str,
           partial: Annotated[bool, typer.Option(help="render a run that did not finish, marked as partial")] = False,
           compare: Annotated[Optional[list[str]], typer.Option(
               "--compare", help="another run (e.g. method.name=local on the same sites): the report shows what "
                                 "RUN_DIR gains each factory over it; repeat it for that run's other seeds")] = None,
           also: Annotated[Optional[list[str]], typer.Option(
               "--also", help="RUN_DIR's method at another seed (paired with --compare runs by run.seed)")] = None,
           ) -> None:
    """Write RUN_DIR/report.html (curves, per-site bars, global vs personalized; with --compare, each factory's
    gain over the other run)."""
    from server.recorder import read_final
    from server.report import render_report

    if compare:
        from launch.pilot import console_lines
        from server.compare import compare as compare_runs
        from server.compare import write_comparison

        try:
            comp = compare_runs([run_dir, *(also or [])], list(compare))
        except ValueError as e:
            err.print(f"[red]--compare: {escape(str(e))}[/]")
            raise typer.Exit(2) from None
        write_comparison(run_dir, comp)
        err.print("\n".join(console_lines(comp)), markup=False)
    elif also:
        err.print("[red]--also needs --compare (the runs to compare against)[/]")
        raise typer.Exit(2)

    if not (Path(run_dir) / "metrics.jsonl").is_file():
        err.print(f"[red]{run_dir} has no metrics.jsonl: not a Kumiki run dir[/]")
        raise typer.Exit(2)
    try:
        read_final(run_dir)
    except (ValueError, IndexError, OSError):
        if not partial:
            err.print(f"[red]{run_dir} did not finish (metrics.jsonl has no final record); "
                      "pass --partial to render what it recorded, marked as partial[/]")
            raise typer.Exit(2) from None
    typer.echo(str(render_report(run_dir)))


@cli.command()
def pilot(
    set_: SetOpt = None,
    engine: Annotated[str, typer.Option(help="local (default: real processes) or simulation / inprocess")] = "local",
    verbose: bool = False,
    overwrite: OverwriteOpt = False,
    seeds: Annotated[int, typer.Option(min=1, max=10, help="training seeds (same factory data); the gain's spread "
                                                            "over them is in the report")] = 3,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="also run each factory alone "
                                                                            "(method.name=local) to compare")] = True,
    extra_engine: Annotated[str, typer.Option(help="engine of the other seeds and of the baseline")] = "inprocess",
    insecure: InsecureOpt = False,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="compare these methods, e.g. fedavg_ft,fedper,ditto: the first is the main run's, the "
                          "others run at every seed on the extra engine; the report ranks them all against each "
                          "factory alone")] = None,
) -> None:
    """The multi-factory pilot: deploy/pilot.toml on real SuperLink/SuperNode processes, its other seeds and
    the local-only baseline (in-process), then the report: what joining gains each factory, and what a new
    factory gets on day one."""
    from kumiki.data.sources import fashion_mnist_available
    from launch.engines import ENGINES
    from kumiki.registry import METHODS
    from launch.pilot import busy_dirs, by_method, console_lines, parse_methods, plan

    try:
        chosen = parse_methods(methods, METHODS)
    except ValueError as e:
        err.print(f"[red]{escape(str(e))}[/]")
        raise typer.Exit(EXIT_USAGE) from None
    if chosen and not baseline:
        err.print("[red]--methods compares every method with each factory alone: drop --no-baseline[/]")
        raise typer.Exit(EXIT_USAGE)
    for e in (engine, extra_engine):
        if e not in ENGINES:
            err.print(f"[red]engines must be one of {', '.join(ENGINES)}[/]")
            raise typer.Exit(2)
    overrides = list(set_ or [])
    cfg = _load(str(PILOT_CONFIG), overrides)
    if cfg.data.dataset == "fashion-mnist" and not fashion_mnist_available(cfg.data.dataset_dir()):
        err.print(f"[yellow]Fashion-MNIST not found in {cfg.data.dataset_dir()}; the pilot falls back to scikit-learn digits[/]")
        overrides = ['data.dataset="digits"', "data.samples_per_site=300", *overrides]
    runs = plan(lambda more: _load(str(PILOT_CONFIG), more), overrides, seeds, baseline, engine, extra_engine,
                chosen)
    busy = busy_dirs(runs)
    if busy and not overwrite:
        err.print(f"[red]run dir(s) already hold a run: {', '.join(map(str, busy))}; pass --overwrite to move them "
                  "aside (nothing is deleted), or choose another run.name[/]")
        raise typer.Exit(EXIT_USAGE)
    main = runs[0]
    done = {0: _execute(main.cfg, main.engine, verbose, overwrite, exit_on_status=False, insecure=insecure)}
    if len(runs) > 1:
        err.print(f"[bold]pilot[/]: {len(runs) - 1} more run(s) on the same factories ({extra_engine} engine): "
                  + ", ".join(f"{r.cfg.run.name} ({r.cfg.method.name}, seed {r.seed})" for r in runs[1:]))
    for i, r in enumerate(runs[1:], start=1):
        try:
            done[i] = _execute(r.cfg, r.engine, verbose, overwrite, exit_on_status=False, insecure=insecure)
        except typer.Exit:  # reported by _execute; the comparison uses the runs that finished
            err.print(f"[yellow]pilot: {r.cfg.run.name} did not finish; the comparison leaves it out[/]")
    joined = by_method(runs, set(done))
    alone = [r.cfg.run_dir() for i, r in enumerate(runs) if r.side == "alone" and i in done]
    if alone and joined.get(main.cfg.method.name):
        from server.compare import compare, write_comparison
        from server.report import render_report

        b_label = "local: each factory alone on its own images"
        comp = compare(joined[main.cfg.method.name], alone, a_label=f"{main.cfg.method.name}, the factories together",
                       b_label=b_label)
        write_comparison(main.cfg.run_dir(), comp)
        err.print("\n".join(console_lines(comp)), markup=False)
        if len(chosen) > 1:
            from launch.pilot import board_lines, write_methods

            rows = write_methods(main.cfg.run_dir(), joined, alone, main.cfg.run.rounds)
            err.print("\n".join(board_lines(rows)), markup=False)
        _copy_sweep(main.cfg.run_dir())
        err.print(f"report: {render_report(main.cfg.run_dir())}")
    code = exit_code(done[0])
    if code == EXIT_OK and len(done) < len(runs):
        code = EXIT_INCOMPLETE
    raise typer.Exit(code)


def _copy_sweep(run_dir: Path) -> None:
    """The measured data-size sweep (``docs/img/pilot_sweep.json``, ``bench/pilot_methods.py``) into the run dir:
    the report draws "where joining pays" from it and marks this run on it."""
    src = PILOT_CONFIG.parents[1] / "docs" / "img" / "pilot_sweep.json"
    if src.is_file():
        (run_dir / "sweep.json").write_text(src.read_text())


site_cli = typer.Typer(no_args_is_help=True, help="A factory's own data: turn its images into a site folder.")
cli.add_typer(site_cli, name="site")


@site_cli.command("import")
def site_import(
    src: Annotated[str, typer.Argument(help="a folder with one sub-folder of images per class, or a CSV of file,label")],
    out: Annotated[Optional[str], typer.Argument(help="the site folder to write (default: $KUMIKI_SITES/NAME, else "
                                                      "~/kumiki-sites/NAME: outside the app directory)")] = None,
    name: Annotated[str, typer.Option("--name", help="the site's name, e.g. factory-x (logs, metrics, report)")] = "",
    role: Annotated[str, typer.Option(help="train (takes part in training) or unseen (evaluated only)")] = "train",
    test_fraction: Annotated[float, typer.Option(help="share of each class kept for the site's test split")] = 0.2,
    size: Annotated[Optional[str], typer.Option(help="resize every image to HEIGHTxWIDTH, e.g. 28x28")] = None,
    grayscale: Annotated[Optional[bool], typer.Option("--grayscale/--rgb", help="one or three channels (default: "
                                                      "one if every image is grayscale)")] = None,
    classes: Annotated[Optional[str], typer.Option(help="the federation's class list, the same at every factory: "
                                                        "a,b,c, a file (another site.json, or one name per line), "
                                                        "or N for integer labels (default: this source's names)")] = None,
    domain: Annotated[Optional[str], typer.Option(help="the camera or line, as the report should show it")] = None,
    seed: Annotated[int, typer.Option(help="seeds the train/test split")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="move an existing OUT aside first")] = False,
) -> None:
    """Turn a factory's labelled images into a site folder (site.json, train.npz, test.npz), checked as the
    site will load it (docs/deployment.md, "Site data folder")."""
    from kumiki.data.imports import default_sites_root, import_site, parse_classes, parse_size
    from kumiki.data.sites import SiteDataError
    from launch.fab import shipped_under

    if not name:
        err.print("[red]--name is required (e.g. --name factory-x)[/]")
        raise typer.Exit(2)
    target = Path(out) if out else default_sites_root() / name
    try:
        done = import_site(src, target, name, role, test_fraction, parse_size(size), grayscale, domain,
                           parse_classes(classes), seed, overwrite)
    except (SiteDataError, OSError, ValueError) as e:
        err.print(f"[red]site import:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    per_class = ", ".join(f"{c} {a}/{b}" for c, (a, b) in done["per_class"].items())
    err.print(f"[green]site {done['name']}[/] ", end="")
    err.print(f"({done['role']}): {done['num_train']} train / {done['num_test']} test "
              f"images of shape {done['input_shape']}, {done['num_classes']} classes (train/test: {per_class})\n"
              f"  -> {done['path']}\n"
              f"  start its SuperNode with --node-config \"site='{done['name']}' data-dir='{done['path']}'\"; the "
              f"federation's config needs data.input_shape = {done['input_shape']} and data.num_classes = "
              f"{done['num_classes']}, and every factory the same --classes ({','.join(done['classes'][:10])})",
              markup=False)
    shipped = shipped_under(Path(done["path"]))
    if shipped:
        err.print(f"[yellow]warning: {done['path']} lies inside the Flower app directory and is not ignored by its "
                  f".gitignore: `flwr build` would ship {', '.join(p.rsplit('/', 1)[-1] for p in shipped)} to every "
                  "node. Keep factory data outside the app (the default) or add the folder to .gitignore.[/]")


@cli.command()
def certs(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="where the CA, the SuperLink certificate and the site keys go")],
    host: Annotated[Optional[list[str]], typer.Option(
        "--host", help="a DNS name or IP address factories dial the SuperLink by (repeat); superlink, localhost, 127.0.0.1, ::1 and host.docker.internal are always in")] = None,
    site: Annotated[Optional[list[str]], typer.Option(
        "--site", help="a factory that gets a key pair (repeat; default: factory-a, factory-b, factory-c)")] = None,
    rotate: Annotated[Optional[list[str]], typer.Option(
        "--rotate", help="replace this factory's key (the old pair is kept as *.old-<time>); then register the new one and revoke the old node")] = None,
    renew_superlink: Annotated[bool, typer.Option(
        "--renew-superlink", help="re-issue the SuperLink certificate (same CA), e.g. for a new --host")] = False,
) -> None:
    """Make (or complete) DIR: a CA, the SuperLink's TLS certificate and one ECDSA key pair per factory."""
    from launch.certs import DEFAULT_SITES, CertError, make_certs, superlink_names

    try:
        bundle = make_certs(directory, list(site or DEFAULT_SITES), list(host or []), rotate=list(rotate or []),
                            renew_superlink=renew_superlink)
    except CertError as e:
        err.print(f"[red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None
    for path in bundle.created:
        typer.echo(f"wrote {path}")
    if not bundle.created:
        typer.echo(f"{directory}: nothing to do (every file exists)")
    typer.echo(f"SuperLink certificate names: {', '.join(superlink_names(bundle.superlink_crt))}")
    typer.echo(f"keep {bundle.ca_key} off the servers; register each factory with "
               f"`flwr supernode register {bundle.root}/sites/<site>.pub <superlink> --name <site>` (deploy/README.md)")


#: the signal that stopped this process (Ctrl-C: SIGINT), for its exit status
_stopped_by: list[int] = []


def _stop_on(signum: int, frame) -> None:  # noqa: ARG001
    """SIGTERM / SIGHUP unwind like Ctrl-C, so every ``finally:`` runs (the local engine stops its processes)."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def signal_exit_code() -> int:
    """The shell's convention for a process a signal stopped: 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + int(_stopped_by[0] if _stopped_by else signal.SIGINT)


def stop_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    stop_on_signals()
    try:
        cli()
    except KeyboardInterrupt as e:
        err.print(f"[red]interrupted{f' ({escape(str(e))})' if str(e) else ''}[/]")
        sys.exit(signal_exit_code())


if __name__ == "__main__":
    main()
