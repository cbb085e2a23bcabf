"""The regional aggregator of WorldLM's deployment shape (b): a SuperNode of the root, a ServerApp of its region.

A sub-federation that must keep its sites off any server outside its legal domain runs its own SuperLink
and one aggregator. The aggregator is an ordinary SuperNode on the root's SuperLink (its own key, TLS),
started with the node config that names its region::

    flower-supernode ... --node-config "site='romance' region-federation='romance' \\
        region-flwr-home='/srv/romance/flwr' region-config='/srv/federation.toml' region-dir='/srv/romance/state'"

This ClientApp mod (Flower's supported extension point) answers every message of the root for such a node:
it writes the message into a job folder under ``region-dir/jobs`` and waits for the answer of the region's
server: one long-lived Flower run on the region's own SuperLink (``flwr run <app> <region-federation>``
with ``region-dir`` in the run config; the region's ``flwr`` connection config lives in
``region-flwr-home``), which the mod starts when none is running (``server/region.py``: it trains or
evaluates the region's sites and writes the answer, which goes back to the root). The sites only ever talk
to their region's SuperLink; their data and state contracts are those of any Kumiki site. A node without
``region-federation`` is an ordinary site: the mod passes its messages on.

Optional node config: ``region-app`` (the app folder ``flwr run`` builds; default: this app), ``region-flwr``
(the ``flwr`` executable; default: ``launch/fastpath.py flwr``, which signs the region's app with
``KUMIKI_APP_SIGNING_KEY`` when the environment names one), ``region-timeout-s`` (default 900).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from kumiki import contract as C, packing
from kumiki.locks import held
from kumiki.atomic import atomic_json

APP_DIR = Path(__file__).resolve().parents[1]
ERR_REGION = 4500  # the region could not answer (its run failed or timed out)
_STARTED = re.compile(r"Successfully started run (\d+)")
BOOT_GRACE_S = 30.0  # a server that was just submitted gets this long to take the lock before anyone asks
UNKNOWN_GRACE_S = 180.0  # ``flwr ls`` that cannot tell (a busy machine times it out) is no verdict for this long
RUN_ID_FILE = "server-run-id"  # the region's submitted server run, known to every job of the region
START_LOCK = "server-start.lock"  # held while a job of the region submits its server: one submission at a time


def is_bridge(context: Context) -> bool:
    return bool(dict(context.node_config).get("region-federation"))


def bridge_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower ClientApp mod: a regional aggregator's node answers through its region; any other node passes."""
    if not is_bridge(context):
        return call_next(msg, context)
    try:
        return answer(msg, dict(context.node_config))
    except Exception as exc:  # noqa: BLE001 - the root gets a coded error reply, never a crash
        return Message(Error(code=ERR_REGION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _kind(msg: Message) -> str:
    mtype = msg.metadata.message_type
    if mtype.startswith("query"):
        return "profile"
    return "train" if mtype.startswith("train") else "evaluate"


def write_job(job_dir: Path, msg: Message, node_config: dict) -> None:
    content = msg.content
    config = content[C.CONFIG] if C.CONFIG in content.config_records else ConfigRecord()
    job = {"kind": _kind(msg), "round": int(config.get(C.ROUND, 0)), "group": str(node_config["site"]),
           "region_dir": str(node_config["region-dir"]),
           "config": {k: str(v) for k, v in config.items() if isinstance(v, (str, int, float)) and k != packing.INDEX}}
    arrays = {}
    if C.ARRAYS in content.array_records:
        arrays.update({f"arrays/{k}": v for k, v in packing.take(content).items()})
    if C.EXTRA in content.array_records:
        arrays.update({f"extra/{k}": v.numpy() for k, v in content[C.EXTRA].items()})
    with open(job_dir / "job.npz", "wb") as f:
        np.savez(f, **arrays)
    # job.json last and whole (written aside, then renamed): the region's server takes a job once job.json
    # exists, and on a loaded machine it read a half-written one and died (tests/test_bridge.py)
    atomic_json(job_dir / "job.json", job)


def server_alive(region_dir: Path) -> bool:
    """Whether the region's ServerApp runs: it holds ``server.lock`` while it lives (``server/region.py``)."""
    return held(region_dir / "server.lock")


def _flwr(node_config: dict) -> tuple[list[str], dict[str, str]]:
    """The ``flwr`` command and the environment that points it at the region's SuperLink.

    By default ``launch/fastpath.py flwr`` (the app's own copy, else the images' ``/opt/kumiki/fastpath.py``): with
    ``KUMIKI_APP_SIGNING_KEY`` in the environment it signs the region's app with that key (the region's sites run
    only apps signed with it: deploy/compose/region.yml), with ``KUMIKI_CLIENT_CERT``/``KEY`` it presents the
    region operator's certificate; without them it is Flower's own CLI. ``region-flwr`` names another executable."""
    env = {**os.environ, "FLWR_HOME": str(node_config["region-flwr-home"])}
    if node_config.get("region-flwr"):
        return [str(node_config["region-flwr"])], env
    for fastpath in (APP_DIR / "launch" / "fastpath.py", Path("/opt/kumiki/fastpath.py")):
        if fastpath.is_file():
            return [sys.executable, str(fastpath), "flwr"], env
    flwr = Path(sys.executable).parent / "flwr"
    return [str(flwr) if flwr.is_file() else shutil.which("flwr") or "flwr"], env


def start_server(node_config: dict, region_dir: Path) -> int | None:
    """``flwr run`` of the region's server (one long-lived run on the region's SuperLink); returns its run id
    once submitted (None when the output names none)."""
    flwr, env = _flwr(node_config)
    app = str(node_config.get("region-app") or APP_DIR)
    log = region_dir / "flwr-run.log"
    proc = subprocess.run([*flwr, "run", app, str(node_config["region-federation"]), "--run-config",
                           f"config='{node_config['region-config']}' region-dir='{region_dir}'"],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=app,
                          timeout=120, start_new_session=True)
    with open(log, "a") as out:
        out.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run of the region's server failed (exit {proc.returncode}); see {log}")
    m = _STARTED.search(proc.stdout)
    return int(m.group(1)) if m else None


def run_status(node_config: dict, run_id: int) -> str:
    """The status of one run on the region's SuperLink (``pending``, ``starting``, ``running``,
    ``finished:...``), or ``unknown`` when ``flwr ls`` cannot tell."""
    flwr, env = _flwr(node_config)
    try:
        out = subprocess.run([*flwr, "ls", str(node_config["region-federation"]), "--run-id", str(run_id),
                              "--format", "json"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=60, start_new_session=True)
        runs = json.loads(out.stdout or "{}").get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
        return "unknown"


def booting(status: str) -> bool:
    """A submitted server whose run has not finished is still on its way to taking the region's lock."""
    return status.split(":")[0] in ("pending", "starting", "running")


def _submitted(region_dir: Path) -> int | None:
    """The run id of the region's server as last submitted by any job of this region (None if none)."""
    try:
        return int((region_dir / RUN_ID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def run_region(job_dir: Path, node_config: dict) -> None:
    """Make sure the region's server runs (starting it when it does not, at most 3 times), then wait for its
    answer to the job, bounded by ``region-timeout-s``.

    A submitted server is not started again while its Flower run is still pending, starting or running (a
    slow start is not a dead server), whichever job of the region submitted it (its run id is kept in the
    region's folder), nor while ``flwr ls`` cannot tell its status (on a busy machine the CLI times out) for
    less than ``UNKNOWN_GRACE_S``: only Flower's word that the run ended, or a long silence, starts another.
    Jobs of one region submit under one lock (``START_LOCK``) and re-read the submitted id inside it, so two jobs
    that both found no server (the root re-asking while the first start is still in ``flwr run``) start one."""
    region_dir = job_dir.parent.parent
    timeout = float(node_config.get("region-timeout-s", 900))
    deadline, starts, checked, boot = time.monotonic() + timeout, 0, 0.0, 0.0
    run_id, unknown_since = _submitted(region_dir), None
    while not (job_dir / "result.json").is_file():
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"the region's server gave no answer within {timeout:.0f}s (see {region_dir})")
        if now - checked > 1.0 and now - boot > BOOT_GRACE_S:
            checked = now
            if not server_alive(region_dir):
                status = run_status(node_config, run_id) if run_id is not None else "finished:none"
                if status == "unknown":
                    unknown_since = now if unknown_since is None else unknown_since
                else:
                    unknown_since = None
                if booting(status) or (unknown_since is not None and now - unknown_since < UNKNOWN_GRACE_S):
                    checked = time.monotonic() + 4.0  # ask Flower again in ~5 s
                    continue
                if starts >= 3:
                    raise RuntimeError(f"the region's server stopped {starts} times without answering; see "
                                       f"{region_dir / 'flwr-run.log'} and the region SuperLink's logs")
                with open(region_dir / START_LOCK, "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # another job of the region may be submitting right now
                    latest = _submitted(region_dir)
                    if latest != run_id:  # it did (or had, since this job looked): wait on that server instead
                        run_id, unknown_since, boot = latest, None, time.monotonic()
                        continue
                    run_id, unknown_since = start_server(node_config, region_dir), None
                    if run_id is not None:
                        (region_dir / RUN_ID_FILE).write_text(str(run_id))
                starts, boot = starts + 1, time.monotonic()
        time.sleep(0.05)


def answer(msg: Message, node_config: dict) -> Message:
    missing = [k for k in ("site", "region-flwr-home", "region-config", "region-dir") if k not in node_config]
    if missing:
        raise ValueError(f"a regional aggregator's node config needs {missing}")
    jobs = Path(str(node_config["region-dir"])) / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_dir = Path(tempfile.mkdtemp(prefix=f"{_kind(msg)}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=jobs))
    write_job(job_dir, msg, node_config)
    run_region(job_dir, node_config)
    result = json.loads((job_dir / "result.json").read_text())
    if result.get("error"):
        err = result["error"]
        return Message(Error(code=int(err.get("code", ERR_REGION)), reason=str(err.get("reason"))), reply_to=msg)
    metrics = result["metrics"]
    if _kind(msg) == "profile":
        rec = ConfigRecord({"site": str(node_config["site"]), "role": "train", "group": str(node_config["site"]),
                            "task": "language", "num-train": int(metrics["num-train"]),
                            "num-test": int(metrics["num-test"])})
        return Message(RecordDict({C.PROFILE: rec}), reply_to=msg)
    content = RecordDict({C.METRICS: MetricRecord(metrics)})
    if (job_dir / "result.npz").is_file():
        with np.load(job_dir / "result.npz") as z:
            packing.put(content, {k: z[k] for k in z.files})  # one array and its index (kumiki/packing.py)
    elif _kind(msg) == "train":
        content[C.ARRAYS] = ArrayRecord()
    return Message(content, reply_to=msg)
