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

from kumiki.config import ConfigError, KumikiConfig, load_config, to_json

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Kumiki: personalized federated learning on Flower.")
err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: --set run.rounds=5 (TOML value)")]
PILOT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "pilot.toml"


def _load(config: str, overrides: list[str] | None) -> KumikiConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None


def _note_method_defaults(cfg: KumikiConfig) -> None:
    if cfg.train_from_method:
        keys = ", ".join(f"train.{k} = {v}" for k, v in cfg.train_from_method.items())
        err.print(f"note: {keys} from {cfg.method.name}'s paper defaults (set them in [train] to override)")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: exit codes of `kumiki run` / `kumiki pilot`
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def _execute(cfg: KumikiConfig, engine: str, verbose: bool, overwrite: bool = False, insecure: bool = False) -> dict:
    """Run, write the report, and exit with the run's status: 0 ok, 3 incomplete (sites missing), 1 failed."""
    from kumiki.data.sites import SiteDataError
    from kumiki.data.sources import DataUnavailable
    from launch.engines import run
    from launch.rundir import RunDirError

    _logging(verbose)
    _note_method_defaults(cfg)
    err.print(f"[bold]kumiki[/] {cfg.method.name} on {cfg.data.dataset}: {cfg.data.sites} sites"
              f" (+{cfg.data.unseen_sites} unseen), {cfg.run.rounds} rounds, engine {engine} -> {cfg.run_dir()}")
    try:
        summary = run(cfg, engine, overwrite=overwrite, insecure=insecure)
    except (SiteDataError, DataUnavailable) as e:
        err.print(f"[red]data error:[/] {e}")
        raise typer.Exit(EXIT_USAGE) from None
    except RunDirError as e:
        err.print(f"[red]run dir:[/] {e}")
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as e:  # noqa: BLE001 - a failed run is reported as failed, never as done
        err.print(f"[red]the run failed:[/] {type(e).__name__}: {e}")
        if (cfg.run_dir() / "summary.json").is_file():
            err.print(f"what it recorded (status 'failed'): {cfg.run_dir() / 'summary.json'}")
        raise typer.Exit(EXIT_FAILED) from None
    try:
        from server.report import render_report

        report = render_report(cfg.run_dir())
        err.print(f"report: {report}")
    except Exception as e:  # noqa: BLE001 - a report failure must not hide a finished run
        err.print(f"[yellow]report not written: {e}[/]")
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
    raise typer.Exit(EXIT_INCOMPLETE if status == "incomplete" else EXIT_FAILED)


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
            typer.echo(f"    {k['key']:<28} = {k['default']!s:<18} {k['meaning']}")
        if m["train_defaults"]:
            td = ", ".join(f"train.{k} = {v}" for k, v in m["train_defaults"].items())
            typer.echo(f"    paper optimizer (used unless [train] sets the key): {td}")
        typer.echo("")


@cli.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the config file."""
    typer.echo(json.dumps(KumikiConfig.model_json_schema(), indent=2))


@cli.command("run")
def run_cmd(
    config: str,
    set_: SetOpt = None,
    engine: Annotated[str, typer.Option(help="inprocess (default: no sockets, no Ray), local (real SuperLink + SuperNodes on 127.0.0.1), simulation (Flower/Ray)")] = "inprocess",
    verbose: bool = False,
    overwrite: OverwriteOpt = False,
    insecure: InsecureOpt = False,
) -> None:
    """Run one federated experiment described by CONFIG (exit 0 ok, 3 sites missing, 1 failed, 2 bad input)."""
    from launch.engines import ENGINES

    if engine not in ENGINES:
        err.print(f"[red]--engine must be one of {', '.join(ENGINES)}[/]")
        raise typer.Exit(2)
    _execute(_load(config, set_), engine, verbose, overwrite, insecure)


@cli.command()
def report(run_dir: str,
           partial: Annotated[bool, typer.Option(help="render a run that did not finish, marked as partial")] = False
           ) -> None:
    """Write RUN_DIR/report.html (curves, per-site bars, global vs personalized)."""
    from server.recorder import read_final
    from server.report import render_report

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
    insecure: InsecureOpt = False,
) -> None:
    """The multi-factory pilot: deploy/pilot.toml on real SuperLink/SuperNode processes, then the report."""
    from kumiki.data.sources import fashion_mnist_available

    overrides = list(set_ or [])
    cfg = _load(str(PILOT_CONFIG), overrides)
    if cfg.data.dataset == "fashion-mnist" and not fashion_mnist_available(cfg.data.dataset_dir()):
        err.print(f"[yellow]Fashion-MNIST not found in {cfg.data.dataset_dir()}; the pilot falls back to scikit-learn digits[/]")
        cfg = _load(str(PILOT_CONFIG), ['data.dataset="digits"', "data.samples_per_site=300", *overrides])
    _execute(cfg, engine, verbose, overwrite, insecure)


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
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    for path in bundle.created:
        typer.echo(f"wrote {path}")
    if not bundle.created:
        typer.echo(f"{directory}: nothing to do (every file exists)")
    typer.echo(f"SuperLink certificate names: {', '.join(superlink_names(bundle.superlink_crt))}")
    typer.echo(f"keep {bundle.ca_key} off the servers; register each factory with "
               f"`flwr supernode register {bundle.root}/sites/<site>.pub <superlink> --name <site>` (deploy/README.md)")


def _stop_on(signum: int, frame) -> None:  # noqa: ARG001
    """SIGTERM / SIGHUP unwind like Ctrl-C, so every ``finally:`` runs (the local engine stops its processes)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on)


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    stop_on_signals()
    try:
        cli()
    except KeyboardInterrupt as e:
        err.print(f"[red]interrupted{f' ({e})' if str(e) else ''}[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
