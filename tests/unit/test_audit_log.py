"""The audit log's hash chain catches an edited, deleted, inserted or
truncated line."""

from __future__ import annotations

import json

from fedgan.audit_log import AuditLog


def _log(tmp_path, n=4):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("site_joined", run="r", site=f"site-{i}", round=1)
    return log


def test_intact_log_verifies_and_chains(tmp_path):
    log = _log(tmp_path)
    verdict = log.verify()
    assert verdict.ok and verdict.entries == 4
    lines = log.path.read_text().splitlines()
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert all(json.loads(line)["event"] == "site_joined" for line in lines)


def test_edit_delete_insert_and_truncation_are_detected(tmp_path):
    for i, (damage, fragment) in enumerate(
        [
            (
                lambda ls: [*ls[:1], ls[1].replace("site-1", "site-9"), *ls[2:]],
                "line 3 does not follow",
            ),
            (lambda ls: ls[:1] + ls[2:], "line 2 does not follow"),
            (lambda ls: [*ls[:2], ls[1], *ls[2:]], "line 3 does not follow"),
            (lambda ls: ls[:-1], "truncated"),
            (lambda ls: [*ls[:2], "{not json", *ls[3:]], "line 3 is not JSON"),
        ]
    ):
        log = _log(tmp_path / str(i))
        lines = log.path.read_text().splitlines()
        log.path.write_text("\n".join(damage(lines)) + "\n")
        verdict = log.verify()
        assert not verdict.ok and fragment in verdict.problem, (fragment, verdict)


def test_appending_after_a_verified_log_keeps_it_valid(tmp_path):
    log = _log(tmp_path, 2)
    AuditLog(log.path).append("run_completed", run="r")
    assert log.verify().entries == 3 and log.verify().ok


def test_certificate_rejections_are_copied_once(tmp_path):
    from fedgan.audit_log import ingest_edge_log

    edge = tmp_path / "edge-access.log"
    ok = '2026-11-23T08:00:00+00:00 edge 10.0.0.1 "POST /x" 200 verify=SUCCESS proto=TLSv1.3\n'
    none = (
        '2026-11-23T08:00:01+00:00 edge 10.0.0.2 "GET / HTTP/1.1" 400 verify=NONE proto=TLSv1.3\n'
    )
    revoked = (
        '2026-11-23T08:00:02+00:00 edge 10.0.0.3 "GET / HTTP/1.1" 400 '
        "verify=FAILED:certificate revoked proto=TLSv1.3\n"
    )
    edge.write_text(ok + none + revoked[:40])  # the last line is still being written
    log = AuditLog(tmp_path / "audit.jsonl")
    assert ingest_edge_log(log, edge) == 1
    edge.write_text(ok + none + revoked)
    assert ingest_edge_log(log, edge) == 1 and ingest_edge_log(log, edge) == 0
    events = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [(e["event"], e["verify"], e["remote"]) for e in events] == [
        ("certificate_rejected", "NONE", "10.0.0.2"),
        ("certificate_rejected", "FAILED:certificate revoked", "10.0.0.3"),
    ]
    edge.write_text(none)  # rotated: a shorter file starts over
    assert ingest_edge_log(log, edge) == 1
    assert log.verify().ok and log.verify().entries == 3


def test_the_exporters_step_records_rejections_beside_the_runs(tmp_path):
    """What `fedgan exporter --edge-log` runs on its timer (a scrape only reads)."""
    import threading

    from fedgan.audit_log import follow_edge_logs, record_certificate_rejections

    edge = tmp_path / "edge-access.log"
    edge.write_text(
        '2026-11-23T08:00:00+00:00 edge 10.0.0.1 "POST /x" 200 verify=SUCCESS proto=TLSv1.3\n'
        '2026-11-23T08:00:01+00:00 edge 10.0.0.2 "GET /" 400 verify=NONE proto=TLSv1.3\n'
    )
    runs = tmp_path / "runs"
    stop = threading.Event()
    stop.set()  # one pass, then return
    follow_edge_logs(runs, [edge], stop=stop)
    log = AuditLog(runs / "audit.jsonl")
    events = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [(e["event"], e["remote"], e["verify"]) for e in events] == [
        ("certificate_rejected", "10.0.0.2", "NONE")
    ]
    assert record_certificate_rejections(runs, [edge]) == 0  # each line once
    assert log.verify().ok and log.verify().entries == 1


def test_a_pass_that_cannot_write_is_reported_and_the_loop_goes_on(tmp_path):
    import threading

    from fedgan.audit_log import follow_edge_logs

    edge = tmp_path / "edge-access.log"
    edge.write_text('2026 edge 10.0.0.2 "GET /" 400 verify=NONE proto=TLSv1.3\n')
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_text("")  # the audit log cannot be created under it
    said: list[str] = []
    stop = threading.Event()
    stop.set()
    follow_edge_logs(not_a_dir, [edge], stop=stop, warn=said.append)
    assert len(said) == 1 and "certificate rejections not recorded" in said[0]
