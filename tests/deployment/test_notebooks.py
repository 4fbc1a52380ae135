"""The three role notebooks, run top to bottom against the running federation.

They find it through ``FEDSYFT_CONFIG`` and passwords through the usual variables, as any
reader running them would. While the scientist's notebook waits for approvals, the data
owners approve through their own servers (in a thread, as people would in their own
notebooks); then one owner's notebook and the officer's run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import PASSWORDS
from .test_http_federation import owner

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"


def _run(name: str, env: dict[str, str], tmp_path: Path) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs"
    saved = dict(os.environ)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(book, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return book


def _text(book) -> str:
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _approve_pending(cfg, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for member in cfg.site:
            me = owner(cfg, member.name)
            for r in me.requests():
                if r.status == "pending" and r.job_id:
                    me.approve(r.request_id, reason="owners' thread in the notebook test")


@pytest.fixture
def notebook_env(deployed, tmp_path):
    return {**PASSWORDS, "FEDSYFT_CONFIG": str(deployed.path), "FEDSYFT_SEED": "31",
            "FEDSYFT_EXPORT_DIR": str(tmp_path)}


def test_the_three_role_notebooks_run_top_to_bottom(deployed, notebook_env, tmp_path):
    stop = threading.Event()
    owners = threading.Thread(target=_approve_pending, args=(deployed, stop), daemon=True)
    owners.start()
    try:
        science = _run("02_data_scientist.ipynb", notebook_env, tmp_path)
    finally:
        stop.set()
        owners.join(timeout=30)
    text = _text(science)
    assert "'roc_auc'" in text and "hospital-c" in text
    pngs = [o for c in science.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2  # the loss curve, the ROC curves and score histograms

    from datasites.deploy.remote import RemoteFederation
    from fed_tasks.spec import JobSpec

    fed = RemoteFederation.connect(deployed, password=PASSWORDS["FEDSYFT_SCIENTIST_PASSWORD"])
    columns = list(fed.sessions()[0].mock().columns)
    pending = JobSpec(model="ae", features=tuple(c for c in columns if c != "anomaly"),
                      label_column="anomaly", rounds=2, seed=32, aggregation="plain",
                      min_sites=2)
    fed.submit(pending)  # what the owner's notebook finds waiting
    site = deployed.site[1].name
    owner_book = _run("01_data_owner.ipynb", {**notebook_env, "FEDSYFT_SITE": site}, tmp_path)
    owner_text = _text(owner_book)
    assert "approved: Request" in owner_text and pending.job_id in owner_text
    assert fed.approvals(pending)[site] == "approved"

    officer = _run("03_compliance_officer.ipynb", notebook_env, tmp_path)
    officer_text = _text(officer)
    assert officer_text.count(" intact ") == len(deployed.members)
    assert pending.job_id in officer_text
    assert all((tmp_path / f"audit-{m.name}.html").is_file() for m in deployed.members)
