"""The deployment commands as users type them: bad input is one line and exit code 2."""

from __future__ import annotations

import socket

import pytest

from .conftest import free_ports, run_cli, write_config

NAMES = ["clinic-a", "clinic-b"]


@pytest.fixture
def small_parts(site_parts):
    return [p.iloc[:300] for p in site_parts[:2]]


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_CONFIGS = {
    "unknown key": ("[federation]\n", "[federation]\ncolour = \"blue\"\n", "colour"),
    "duplicate port": (None, None, "port"),
    "not loopback": ('port = {p0}\n', 'port = {p0}\nhost = "0.0.0.0"\n', "host"),
    "missing data": ('data = "data/clinic-a.csv"', 'data = "data/nowhere.csv"', "nowhere.csv"),
    "one site": (None, None, "site"),
    "not toml": ("[federation]", "[federation", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_federation_toml_is_one_line_naming_the_key(case, small_parts, tmp_path):
    ports = free_ports(3)
    config = write_config(tmp_path, small_parts, NAMES, ports, authority=False)
    text = config.read_text()
    old, new, needle = BAD_CONFIGS[case]
    if case == "duplicate port":
        text = text.replace(f"port = {ports[1]}", f"port = {ports[0]}")
    elif case == "one site":
        text = text[:text.index("[[site]]", text.index("[[site]]") + 1)]
    else:
        text = text.replace(old.format(p0=ports[0]), new.format(p0=ports[0]), 1)
    config.write_text(text)
    proc = run_cli("up", "--config", str(config))
    _one_line_error(proc, str(config.name), needle)
    assert not (tmp_path / "sites").exists()  # nothing provisioned


def test_up_on_a_port_in_use_names_it_and_provisions_nothing(small_parts, tmp_path):
    ports = free_ports(3)
    config = write_config(tmp_path, small_parts, NAMES, ports, authority=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[1]))
        busy.listen()
        proc = run_cli("up", "--config", str(config))
    _one_line_error(proc, f"port {ports[1]}", "clinic-b", "in use")
    assert not (tmp_path / "sites").exists()


def test_status_of_a_federation_that_is_down_exits_1(small_parts, tmp_path):
    config = write_config(tmp_path, small_parts, NAMES, free_ports(3), authority=False)
    proc = run_cli("status", "--config", str(config))
    assert proc.returncode == 1
    assert proc.stdout.count(" down ") == 2


def test_resume_of_an_unknown_job_is_one_line(small_parts, tmp_path):
    config = write_config(tmp_path, small_parts, NAMES, free_ports(3), authority=False)
    proc = run_cli("train", "--config", str(config), "--job", "0badc0de", "--resume",
                   env={"FEDSYFT_HOME": str(tmp_path / "home")})
    _one_line_error(proc, "--job 0badc0de", "no such job")


def test_the_scientist_and_owners_over_the_cli(deployed, tmp_path):
    """status, submit, train before approval (refused), owners approve with the CLI on
    their running servers, train with a report."""
    config = str(deployed.path)
    env = {"FEDSYFT_HOME": str(tmp_path / "home")}
    status = run_cli("status", "--config", config)
    assert status.returncode == 0 and status.stdout.count(" up ") == 4, status.stdout
    sub = run_cli("submit", "--config", config, "--rounds", "2", "--seed", "21", env=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.split()[1]
    request = {line.split()[0]: line.split()[2] for line in sub.stdout.splitlines()
               if " request " in line}
    assert set(request) == {s.name for s in deployed.site}
    early = run_cli("train", "--config", config, "--job", job, env=env)
    _one_line_error(early, "not approved yet", "hospital-a")
    wrong = run_cli("requests", "list", "--config", config, "--site", "hospital-a",
                    env={"FEDSYFT_OWNER_PASSWORD": "Wrong-password-0000"})
    _one_line_error(wrong, "wrong email or password")
    for name, rid in request.items():
        ok = run_cli("requests", "approve", rid, "--config", config, "--site", name)
        assert ok.returncode == 0 and f"approved at {name}" in ok.stdout, ok.stderr
    report = tmp_path / "report.json"
    done = run_cli("train", "--config", config, "--job", job, "--report", str(report), env=env)
    assert done.returncode == 0, done.stderr
    import json

    doc = json.loads(report.read_text())
    assert doc["rounds_completed"] == 2 and len(doc["per_site"]) == 3
    losses = doc["federated"]["losses"]
    assert len(losses) == 2 and losses[1] < losses[0]  # it trained, at every site's rows
    again = run_cli("train", "--config", config, "--job", job, env=env)
    _one_line_error(again, "already ran", "--resume")


def test_the_officer_audits_a_running_site_over_http(deployed, tmp_path):
    """``audit verify|requests|export --config --site NAME``: the server sends a copy of its
    log (officer login), checked on the officer's side; what left is logged; a wrong
    password is one line, exit 2, and logged."""
    from datasites.governance.audit import load_entries

    config, member = str(deployed.path), deployed.site[1]
    verify = run_cli("audit", "verify", "--config", config, "--site", member.name)
    assert verify.returncode == 0, verify.stderr
    assert "hash chain intact, head signature valid" in verify.stdout
    assert f"site {member.name} (a copy from its server)" in verify.stdout
    listed = run_cli("audit", "requests", "--config", config, "--site", member.name)
    assert listed.returncode == 0, listed.stderr
    out = tmp_path / "log.html"
    export = run_cli("audit", "export", "--config", config, "--site", member.name,
                     "--format", "html", "--out", str(out))
    assert export.returncode == 0, export.stderr
    assert "<html" in out.read_text().lower() and "server_started" in out.read_text()
    copies = [e for e in load_entries(member.directory) if e["action"] == "audit_exported"
              and e["params"].get("format") == "copy"]
    assert [e["params"]["purpose"] for e in copies[-3:]] == ["verify", "requests", "export"]
    assert all(e["actor"] == member.officer for e in copies[-3:])
    wrong = run_cli("audit", "verify", "--config", config, "--site", member.name,
                    env={"FEDSYFT_OFFICER_PASSWORD": "not-the-officers-pw-1"})
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "wrong email or password" in wrong.stderr and "Traceback" not in wrong.stderr
    failed = [e for e in load_entries(member.directory) if e["action"] == "login_failed"]
    assert failed and failed[-1]["actor"] == member.officer
    unknown = run_cli("audit", "verify", "--config", config, "--site", "no-such-site")
    assert unknown.returncode == 2 and "no-such-site" in unknown.stderr
    from datasites.deploy.officer import OfficerClient

    from .conftest import PASSWORDS

    client = OfficerClient.connect(deployed, member.name,
                                   password=PASSWORDS["FEDSYFT_OFFICER_PASSWORD"])
    sent = {p.name for p in client.copy("verify", tmp_path / "copy").iterdir()}
    assert {"audit.jsonl", "audit.head.json", "audit_key.pub"} <= sent
    assert sent <= {"audit.jsonl", "audit.head.json", "audit_key.pub", "site.json",
                    "provisioned.json", "approvals.json"}  # no key, password hash or store


def _consecutive_free_ports(n: int) -> int:
    from datasites.deploy.processes import port_free

    for _ in range(50):
        base = free_ports(1)[0]
        if base + n < 65000 and all(port_free("127.0.0.1", base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


def test_init_then_up_status_down_as_a_newcomer_types_it(shuttle_small, tmp_path):
    """``fedsyft init DIR`` writes a federation that ``up`` runs as it is; a second init
    into the same directory is refused in one line; ``status`` after ``down`` exits 1."""
    data = tmp_path / "rows.csv"
    shuttle_small.iloc[:900].to_csv(data, index=False)
    fed, base = tmp_path / "fed", _consecutive_free_ports(3)
    init = run_cli("init", str(fed), "--data", str(data), "--sites", "2",
                   "--base-port", str(base))
    assert init.returncode == 0, init.stderr
    assert sorted(p.name for p in (fed / "data").iterdir()) == ["site-1.csv", "site-2.csv"]
    _one_line_error(run_cli("init", str(fed), "--data", str(data)), "already exists")
    config = str(fed / "federation.toml")
    up = run_cli("up", "--config", config)
    try:
        assert up.returncode == 0, up.stderr
        status = run_cli("status", "--config", config)
        assert status.returncode == 0 and status.stdout.count(" up ") == 3, status.stdout
        assert f"127.0.0.1:{base}" in status.stdout
    finally:
        down = run_cli("down", "--config", config)
    assert down.returncode == 0, down.stderr
    assert run_cli("status", "--config", config).returncode == 1
