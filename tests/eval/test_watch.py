"""`python -m eval.watch` beside a real training run: every checkpoint scored exactly once in metrics.jsonl and in the
run's (offline) wandb history, across a SIGKILL of the watcher, although keep-last-1 deletes the older checkpoints;
and its pieces: one-line errors, the metrics.jsonl reader. The exports it uses: tests/training/test_engine_export.py;
what keep-last-N owes it: tests/training/test_checkpoint_readers.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.data import make_t2i_data

from eval.watch.cli import main
from eval.watch.record import MetricsLog, offline_history, scores_row
from training.run_guard import RunLock

REPO = Path(__file__).resolve().parents[2]
GENERATION = ["--per-tag", "1", "--images-per-prompt", "1", "--batch-size", "6", "--steps", "2"]
GENERATION += ["--chance-samples", "0", "--image-size", "32x32", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_t2i_data(tmp_path_factory.mktemp("watch_data"))


def train_command(run_dir: Path, data: dict, total: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        str(REPO / "training" / "configs" / "tiny_t2i.yaml"),
        f"run_dir={run_dir}",
        f"data.data_dir={data['tokens']}",
        f"schedule.total_steps={total}",
        "schedule.warmup_steps=1",
        "checkpoint.every=2",
        "checkpoint.keep_last=1",
        f"model.text_tokenizer={data['text']}",
        f"model.image_tokenizer={data['ae']}",
        "logging.wandb=offline",
        "checkpoint.export_official=false",
        *extra,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}  # "auto": offline
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(what: str, ready, deadline_s: float, procs=()) -> None:
    """Poll `ready()` until it holds; fail naming `what` at the deadline or when a watched process died."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        for name, proc, log in procs:
            assert proc.poll() is None, f"{name} exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {deadline_s} s"
        time.sleep(0.1)


def watch_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if "watch/task" in r]


@pytest.mark.slow
def test_every_checkpoint_is_scored_once_across_a_kill_and_keep_last_one(data, tmp_path):
    """The watcher starts first; the trainer saves steps 2 and 4; the watcher is SIGKILLed once its entry of step 2 is
    written. Its registration stays live (younger than --stale-after), so the resumed trainer keeps steps 4 and 6 for
    it although keep-last is 1, and deletes step 2; the watcher restarted (on 2 ranks) scores 4, 6 and 8."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    watch = [sys.executable, "-m", "eval.watch", "--run-dir", str(run), "--task", "shapes", "--until-step", "8"]
    watch += ["--interval", "0.2", *GENERATION]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    logs = {name: tmp_path / f"{name}.log" for name in ("watch1", "watch2", "train1", "train2")}
    registration = run / "watch" / "readers" / "shapes.json"
    started: list[subprocess.Popen] = []
    try:
        started.append(w1 := start(watch, logs["watch1"]))
        wait_for("watcher registration", registration.is_file, 60, [("watcher", w1, logs["watch1"])])
        started.append(t1 := start(train_command(run, data, 4), logs["train1"]))
        wait_for("first scored entry", lambda: watch_rows(run), 120, [("watcher", w1, logs["watch1"])])
        w1.send_signal(signal.SIGKILL)
        w1.wait(timeout=30)
        assert t1.wait(timeout=120) == 0, logs["train1"].read_text()[-3000:]
        started.append(t2 := start(train_command(run, data, 8), logs["train2"]))  # resumes at 4, saves 6 and 8
        assert t2.wait(timeout=120) == 0, logs["train2"].read_text()[-3000:]
        started.append(w2 := start([*torchrun, *watch[1:]], logs["watch2"]))  # resumes where the killed one stopped
        assert w2.wait(timeout=300) == 0, logs["watch2"].read_text()[-3000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    rows = watch_rows(run)
    assert sorted(r["step"] for r in rows) == [2, 4, 6, 8], rows  # each once: none twice, none lost
    assert all(r["watch/checkpoint"] == f"step_{r['step']:08d}" and 0 <= r["watch/score"] <= 1 for r in rows)
    history = [h for h in offline_history(run) if "watch/step" in h]  # the trainer's and the watcher's .wandb files
    assert sorted(h["watch/step"] for h in history) == [2, 4, 6, 8], history
    assert {h["watch/step"]: h["watch/score"] for h in history} == {r["step"]: r["watch/score"] for r in rows}
    assert all(h["watch/samples/_type"] == "image-file" for h in history)
    assert sorted(p.name for p in (run / "samples").glob("watch_*.png")) == [f"watch_{s:08d}.png" for s in (2, 4, 6, 8)]
    kept = "keep-last: keeping step_00000004, step_00000006 for checkpoint reader shapes (not read yet)"
    assert kept in logs["train2"].read_text()  # at the save of step 8
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (4, 6, 8)]
    assert not registration.exists() and not list((run / "watch" / "shapes").glob("step_*"))  # clean exit, no scratch
    assert "watch shapes: 3 evaluated" in logs["watch2"].read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--run-dir", str(tmp_path / "nope"), "--task", "shapes"], "--run-dir .*nope does not exist"),
        (["--run-dir", str(tmp_path), "--task", "nope"], "argument --task: invalid choice: 'nope'"),
        (["--run-dir", str(tmp_path), "--task", "prompts", "--prompt", "x"], "--task prompts has no scorer"),
        (["--run-dir", str(tmp_path), "--task", "shapes", "--geneval-repo", "x"], "--geneval-repo goes with"),
        (["--run-dir", str(tmp_path), "--task", "shapes", "--interval", "0"], "--interval must be > 0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("python -m eval.watch: error: ") and re.search(message, err[0]), err


def test_a_watcher_started_before_the_first_checkpoint_waits_for_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    main(["--run-dir", str(tmp_path / "run"), "--task", "shapes", "--once"])  # --once: nothing there yet, so done
    assert f"waiting for the first checkpoint in {tmp_path / 'run' / 'checkpoints'}" in capsys.readouterr().out


def test_a_killed_watchers_scratch_of_recorded_steps_is_swept_at_the_next_start(tmp_path, capsys):
    """What a watcher SIGKILLed after recording a step can leave (its scratch folder half deleted, without the model,
    or renamed aside) goes when the next one starts, even with that checkpoint deleted since; the scratch of a step
    not recorded yet (an export to resume from) stays."""
    run = tmp_path / "run"
    state = run / "watch" / "shapes"
    run.mkdir()
    MetricsLog(run).append(scores_row("shapes", 2, "step_00000002", {"overall": 0.5}, "overall", {}))
    for name in ("step_00000002/samples/00000", ".removing-step_00000004-123/model", "step_00000006/model"):
        (state / name).mkdir(parents=True)
    main(["--run-dir", str(run), "--task", "shapes", "--once"])
    assert sorted(p.name for p in state.iterdir() if p.is_dir()) == ["step_00000006"]


def test_a_run_config_without_tokenizers_is_one_line_and_exit_2(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    config = {"model": {"kind": "t2i", "text_tokenizer": None, "image_tokenizer": None}, "schedule": {"total_steps": 2}}
    (checkpoint / "trainer.json").write_text(json.dumps({"step": 2, "config": config}))
    with pytest.raises(SystemExit) as exit_:
        main(["--run-dir", str(tmp_path), "--task", "shapes", "--once", "--image-size", "32x32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0] == "python -m eval.watch: error: the run's config has no model.text_tokenizer; pass --text-tokenizer"
    assert not (tmp_path / "watch" / "readers" / "shapes.json").exists()
    with pytest.raises(SystemExit):
        main(["--run-dir", str(tmp_path), "--task", "shapes", "--once", "--text-tokenizer", str(tmp_path / "nope")])
    assert "text tokenizer " in capsys.readouterr().err
    other = RunLock(tmp_path / "watch" / "shapes")  # another watcher of this run and task
    try:
        with pytest.raises(SystemExit):
            main(["--run-dir", str(tmp_path), "--task", "shapes", "--once"])
    finally:
        other.release()
    assert f"another `eval.watch --task shapes` watches {tmp_path} (pid {os.getpid()})" in capsys.readouterr().err


def test_metrics_log_reads_whole_rows_only_and_appends_one_row_per_write(tmp_path):
    log = MetricsLog(tmp_path)
    path = tmp_path / "metrics.jsonl"
    row = scores_row("shapes", 2, "step_00000002", {"overall": 0.5, "per_tag": {"colors": 1.0}}, "overall", {})
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 3, "lo')  # a trainer row half written
    log.refresh()
    assert log.done == set() and log.offset == len(json.dumps({"step": 1, "loss": 2.0})) + 1
    with path.open("a") as f:
        f.write('ss": 1.0}\n' + json.dumps(row) + "\n")
    log.refresh()
    assert log.is_done("shapes", 2) and not log.is_done("geneval", 2)
    log.append({**row, "step": 4})
    assert json.loads(path.read_text().splitlines()[-1])["watch/per_tag/colors"] == 1.0
    fresh = MetricsLog(tmp_path)
    fresh.refresh()
    assert fresh.done == {("shapes", 2), ("shapes", 4)}
