"""Check command lines against the pinned Flower's own parsers (no process is started).

``check(argv)`` takes one command as a list: ``flower-superlink ...``, ``flower-supernode ...``,
``flower-superexec ...``, ``python launch/fastpath.py supernode|superexec ...`` (the same
parsers) or ``flwr <command> ...`` (Flower's typer/click CLI). It raises ``FlagError`` naming
the command and the flag when Flower would refuse it, or when it uses a deprecated flag.
Also: ``interpolate`` (Compose's ``${VAR}`` forms), ``commands_in_markdown`` (the commands of
a document's shell blocks), ``load_yaml`` (Compose files, with the ``!reset`` tag).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import yaml

DAEMONS = ("flower-superlink", "flower-supernode", "flower-superexec")


class FlagError(AssertionError):
    pass


def argparse_parser(program: str) -> argparse.ArgumentParser:
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    if program == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args

        return _parse_args()
    raise KeyError(program)


def _deprecated(action: argparse.Action) -> bool:
    return action.help == argparse.SUPPRESS or "deprecated" in str(action.help or "").lower()


def check_daemon(program: str, args: list[str]) -> argparse.Namespace:
    parser = argparse_parser(program)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(args)
    except SystemExit:
        raise FlagError(f"{program} refuses {shlex.join(args)}:\n{err.getvalue().strip().splitlines()[-1]}") from None
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for tok in args:
        flag = tok.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag not in by_flag:  # argparse accepts unambiguous prefixes; we write every flag in full
            raise FlagError(f"{program}: {flag} is not a full flag name of the pinned Flower")
        if _deprecated(by_flag[flag]):
            raise FlagError(f"{program}: {flag} is deprecated in the pinned Flower")
    for key in ("node_config",):
        if getattr(ns, key, None):
            from flwr.common.config import parse_config_args

            try:
                parse_config_args([getattr(ns, key)])
            except Exception as e:  # noqa: BLE001
                raise FlagError(f"{program}: --node-config {getattr(ns, key)!r}: {e}") from None
    return ns


def check_flwr_cli(args: list[str]) -> dict:
    import click
    import typer
    from flwr.cli.app import app

    cmd: click.Command = typer.main.get_command(app)
    rest, path = list(args), ["flwr"]
    while isinstance(cmd, click.Group):
        if not rest or rest[0] not in cmd.commands:
            raise FlagError(f"{' '.join(path)}: no such command {rest[:1]}")
        name = rest.pop(0)
        cmd, path = cmd.commands[name], [*path, name]
    try:
        ctx = cmd.make_context(" ".join(path), rest)
    except click.UsageError as e:
        raise FlagError(f"{' '.join(path)} refuses {shlex.join(rest)}: {e}") from None
    rc = ctx.params.get("run_config_overrides")
    if rc:
        from flwr.common.config import parse_config_args

        values = [rc] if isinstance(rc, str) else list(rc)
        if not (len(values) == 1 and values[0].endswith(".toml")):
            try:
                parse_config_args(values)
            except Exception as e:  # noqa: BLE001
                raise FlagError(f"flwr run --run-config {values!r}: {e}") from None
    return ctx.params


def check(argv: list[str]) -> object:
    """Parse one command line with the Flower parser that would read it."""
    argv = [a for a in argv if a]
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # FOO=1 flower-superlink ...
        argv = argv[1:]
    if not argv:
        raise FlagError("empty command")
    head = Path(argv[0]).name
    if head in ("python", "python3") and len(argv) > 2 and argv[1].endswith("fastpath.py"):
        return check_daemon(f"flower-{argv[2]}", argv[3:])
    if head in DAEMONS:
        return check_daemon(head, argv[1:])
    if head == "flwr":
        return check_flwr_cli(argv[1:])
    raise FlagError(f"not a Flower command: {argv[0]}")


# --------------------------------------------------------------------------- Compose
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if (not val) if op == ":?" else val is None:
                raise KeyError(f"{name}: {arg}")
            return val
        return val or ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"').strip("'")
    return out


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: loader.construct_sequence(node) if isinstance(
    node, yaml.SequenceNode) else (loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None))
_Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node) if isinstance(
    node, yaml.SequenceNode) else loader.construct_mapping(node))


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader + Compose's two tags


PROGRAMS = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}


def program_of(service: dict) -> str | None:
    """The Flower program a Compose service runs: from its image (kumiki/<x> or flwr/<x>)."""
    m = re.match(r"^(?:kumiki|flwr)/(superlink|supernode|superexec)[:@]", str(service.get("image", "")))
    return PROGRAMS[m.group(1)] if m else None


# --------------------------------------------------------------------------- Markdown
def commands_in_markdown(text: str) -> list[list[str]]:
    """Every Flower command in the document's ```bash/```sh/```console blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:
                continue
            while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                argv = argv[1:]
            if argv and (Path(argv[0]).name in (*DAEMONS, "flwr") or
                         (Path(argv[0]).name.startswith("python") and len(argv) > 1 and argv[1].endswith("fastpath.py"))):
                out.append(argv)
    return out
