"""A study deployed on 127.0.0.1: a coordinator with no data, three institutions with their
own CSV files (missing values the study imputes, categorical columns), federated statistics
and evaluation, DP and secure aggregation over TLS with node authentication; then the served
model answers a prediction by the study's feature names, over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from fedaiot.launch.processes import free_port
from fedaiot.studies.bundled import export
from fedaiot.studies.spec import load_study
from tests.deploy_support import federation
from tests.test_deploy_e2e import (
    FEDAIOT,
    TIMEOUT,
    Processes,
    _rounds,
    _wait_for,
    processes,
    registered,
)
from tests.waiting import answers, wait_until

pytestmark = pytest.mark.slow
STUDY = Path(__file__).parent.parent / "simulations" / "studies" / "pbc.toml"
SITES = ["alpha", "beta", "gamma"]
__all__ = ["processes"]  # the fixture, shared with the other deployment test


def _site_files(tmp_path: Path) -> dict[str, Path]:
    """Each institution's own CSV: its rows of the bundled table, the site column dropped."""
    study = load_study(STUDY)
    table = tmp_path / "all.csv"
    export("pbc", table, columns=[f.name for f in study.features] + ["status"], sites=3)
    header, *rows = table.read_text().splitlines()
    files = {}
    for index, name in enumerate(SITES):
        own = [r.rsplit(",", 1)[0] for r in rows if r.endswith(f",site-{index + 1}")]
        files[name] = tmp_path / name / "records.csv"
        files[name].parent.mkdir()
        files[name].write_text("\n".join([header.rsplit(",", 1)[0], *own]) + "\n")
    return files


def test_a_study_deployed_with_a_coordinator_that_holds_no_data(
    tmp_path: Path, processes: Processes
) -> None:
    fed = federation(tmp_path, SITES, bundle=True)
    pki = fed.pki
    files = _site_files(tmp_path)
    assert "NA" in files["beta"].read_text()  # lab values the study imputes
    run_config = tmp_path / "run.toml"
    run_config.write_text(
        f'study = "{STUDY}"\nnum-rounds = 2\nepsilon = 2.0\nlearning-rate = 1.0\n'
        "sample-rate = 0.5\n"
    )
    port, state = free_port(), tmp_path / "state"
    node = ["node", "start", "--superlink", f"127.0.0.1:{port}"]
    coordinator = ["coordinator", "start", "--run-config", str(run_config), "--pki", str(pki)]
    coordinator += ["--state", str(state), "--port", str(port), "--json"]
    coordinator += ["--bundle", str(fed.bundle), "--approval", str(fed.approvals)]
    log = tmp_path / "coordinator.log"
    running = processes.start(coordinator, log)
    _wait_for("registration", lambda: registered(log), timeout=300, logs=[log])
    for name in SITES:
        kit = str(fed.kits[name])
        args = [*node, "--study", str(STUDY), "--data", str(files[name]), "--kit", kit]
        processes.start([*args, "--port", str(free_port())], tmp_path / f"{name}.log")
    assert running.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["rounds"] == 2
    run = state / "runs" / "pbc"
    assert _rounds(run) == [1, 2]
    events = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    prepared = next(e for e in events if e["event"] == "prepared")
    assert prepared["error"] == "" and prepared["contributors"] == 3
    last = [e for e in events if e["event"] == "round"][-1]
    assert last["evaluation"]["error"] == "" and "accuracy" in last["metrics"]
    assert sorted(n["id"] for n in summary["nodes"]) == SITES  # named by their keys
    assert (run / "statistics.json").exists()

    # The registry is served: a clinician predicts for one patient, by the study's names.
    serve_port = free_port()
    server = processes.start(
        ["coordinator", "serve", "--run", "pbc", "--pki", str(pki), "--state", str(state),
         "--port", str(serve_port)],
        tmp_path / "serve.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{serve_port}"
    wait_until(lambda: answers(url + "/healthz"), "the inference service", process=server)
    token = subprocess.run(
        [*FEDAIOT, "token", "issue", "--role", "clinician", "--subject", "dr-q",
         "--key", str(pki / "coordinator" / "coordinator.key")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    patient = {"age": 51.2, "sex": "f", "ascites": False, "hepato": True, "spiders": None,
               "edema": "0.5", "bili": 3.2, "chol": None, "albumin": 3.4, "copper": 90,
               "alk.phos": 1800, "ast": 120.5, "trig": 140, "platelet": 250, "protime": 10.8,
               "stage": "3"}  # fmt: skip
    answer = httpx.post(
        url + "/v1/predict",
        json={"instances": [patient]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert prediction["label"] in ("alive", "died")
    assert set(prediction["probabilities"]) == {"alive", "died"}
