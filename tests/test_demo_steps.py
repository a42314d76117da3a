"""The demo's step runner: unchanged steps are skipped, changed ones start clean, interrupted ones resume."""

from __future__ import annotations

import json

import pytest

from mmed_rag.demo.steps import StepRunner


def make_step(calls: list, output, source):
    def action():
        calls.append(output.exists())  # did the step find its old output?
        output.mkdir(exist_ok=True)
        (output / "result.txt").write_text(source.read_text().upper())
        return {"length": len(source.read_text())}

    return action


def test_unchanged_skips_changed_reruns_from_clean_outputs(tmp_path):
    source, output, calls = tmp_path / "in.txt", tmp_path / "out", []
    source.write_text("abc")
    first = StepRunner(tmp_path / "demo")
    assert first.run("upper", make_step(calls, output, source), params={"k": 1}, inputs=[source], outputs=[output]) == {
        "length": 3
    }
    again = StepRunner(tmp_path / "demo")
    result = again.run("upper", make_step(calls, output, source), params={"k": 1}, inputs=[source], outputs=[output])
    assert result == {"length": 3} and calls == [False] and again.records[0].skipped

    source.write_text("abcd")  # an input's content changed: the old output is removed before the step reruns
    changed = StepRunner(tmp_path / "demo")
    assert changed.run("upper", make_step(calls, output, source), params={"k": 1}, inputs=[source], outputs=[output])
    assert calls == [False, False] and (output / "result.txt").read_text() == "ABCD"

    # a parameter change and --fresh rerun too
    StepRunner(tmp_path / "demo").run("upper", make_step(calls, output, source), params={"k": 2}, inputs=[source])
    StepRunner(tmp_path / "demo", fresh=True).run(
        "upper", make_step(calls, output, source), params={"k": 2}, inputs=[source], outputs=[output]
    )
    assert len(calls) == 4 and not any(record.skipped for record in StepRunner(tmp_path / "demo").records)


def test_a_missing_output_reruns_and_an_interrupted_step_keeps_its_partial_outputs(tmp_path):
    source, output, calls = tmp_path / "in.txt", tmp_path / "out", []
    source.write_text("abc")
    runner = StepRunner(tmp_path / "demo")
    runner.run("upper", make_step(calls, output, source), inputs=[source], outputs=[output])
    (output / "result.txt").unlink()
    output.rmdir()
    runner.run("upper", make_step(calls, output, source), inputs=[source], outputs=[output])
    assert calls == [False, False]

    def interrupted():
        output.mkdir(exist_ok=True)
        (output / "checkpoint").write_text("half")
        raise KeyboardInterrupt

    source.write_text("xyz")
    with pytest.raises(KeyboardInterrupt):
        runner.run("upper", interrupted, inputs=[source], outputs=[output])
    record = json.loads((tmp_path / "demo" / ".steps" / "upper.json").read_text())
    assert record["finished"] is False
    # The same step again finds its partial output (its stage would resume from the checkpoint).
    runner.run("upper", make_step(calls, output, source), inputs=[source], outputs=[output])
    assert calls[-1] is True and (output / "checkpoint").read_text() == "half"
