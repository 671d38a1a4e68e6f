"""Reading a round's timeline from marks (`fedgan.timeline.rounds`), on a
hand-made timeline whose answer is known."""

from __future__ import annotations

import json

import pytest

from fedgan import timeline


def _marks() -> list[dict]:
    t0 = 1000.0
    m = [
        {"t": t0, "pid": 1, "event": "server.round", "round": 1},
        {"t": t0 + 0.1, "pid": 1, "event": "server.send", "kind": "train", "group": "1", "n": 2},
    ]
    for pid, delay, steps in ((10, 0.5, 2.0), (11, 0.7, 3.0)):
        start = t0 + 0.1 + delay
        m += [
            {"t": start + 0.9, "pid": pid, "event": "clientapp.loading", "started": start},
            {"t": start + 1.0, "pid": pid, "event": "clientapp.loaded"},
            {"t": start + 1.1, "pid": pid, "event": "site.begin", "stage": "train", "group": "1"},
            {"t": start + 1.5, "pid": pid, "event": "site.silo"},
            {"t": start + 1.6, "pid": pid, "event": "site.admitted"},
            {"t": start + 1.6 + steps, "pid": pid, "event": "site.steps"},
            {"t": start + 1.7 + steps, "pid": pid, "event": "site.trained"},
            {"t": start + 1.8 + steps, "pid": pid, "event": "site.end", "stage": "train"},
        ]
    end = t0 + 0.8 + 1.8 + 3.0 + 0.4  # the slower site's end, then its reply
    m += [
        {"t": end, "pid": 1, "event": "server.done", "kind": "train", "group": "1"},
        {"t": end + 0.1, "pid": 1, "event": "server.collected", "round": 1},
        {"t": end + 0.2, "pid": 1, "event": "server.applied", "round": 1},
        {"t": end + 0.5, "pid": 1, "event": "server.published", "round": 1},
        {"t": end + 0.6, "pid": 1, "event": "server.kept", "round": 1},
    ]
    return m


def test_a_round_is_read_into_its_parts(tmp_path):
    path = tmp_path / "timeline.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in reversed(_marks())))
    (r,) = timeline.rounds(timeline.read(path))
    assert r.round == 1 and r.wall == pytest.approx(6.6)
    (stage,) = r.stages
    assert stage.kind == "train" and stage.sites == 2
    # The slowest site's figure for each part; "back" from the last to finish.
    assert stage.parts == pytest.approx(
        {"deliver": 0.7, "flower": 0.9, "imports": 0.1, "handler": 3.7, "back": 0.4}
    )
    assert r.train == pytest.approx(
        {"silo": 0.4, "admit": 0.1, "steps": 3.0, "update": 0.1, "mask": 0.1}
    )
    assert r.between == pytest.approx(0.1)
    assert r.server == pytest.approx(
        {"unmask+decode": 0.1, "apply": 0.1, "publish": 0.3, "keep": 0.1}
    )
    assert r.overhead == pytest.approx(3.6)
    assert timeline.table(r)[0].startswith("round 1: 6.60 s")


def test_an_unfinished_round_or_stage_is_left_out(tmp_path):
    """A stop mid-round 2 (a send never done, no kept mark) and a reused
    file: round 1 reads as before, nothing raises."""
    marks = _marks()
    t = marks[-1]["t"]
    marks += [
        {"t": t + 1, "pid": 1, "event": "server.round", "round": 2},
        {"t": t + 2, "pid": 1, "event": "server.send", "kind": "train", "group": "2", "n": 2},
    ]
    path = tmp_path / "timeline.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in marks))
    (r,) = timeline.rounds(timeline.read(path))
    assert r.round == 1 and r.wall == pytest.approx(6.6)


def test_marks_are_written_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    monkeypatch.delenv(timeline.ENV, raising=False)
    timeline.mark("x")
    assert not path.exists()
    monkeypatch.setenv(timeline.ENV, str(path))
    timeline.mark("x", stage="train")
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["event"] == "x" and path.stat().st_mode & 0o077 == 0
    started = timeline.process_started()
    assert started is not None and 0 < json.loads(line)["t"] - started < 3600
