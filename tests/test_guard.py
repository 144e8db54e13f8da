"""The guard: its rules on the figures a run reports, the trainer acting on an alert, and the recipe of
docs/steering.md on a real run (experts die without the balancing loss; the guard pauses the run;
`moe-tui set` brings them back)."""

from __future__ import annotations

import json
import re
import threading

from moe_core.config import Config
from moe_core.events import Alert, EvalMetrics, LayerRouting, RouterStats, StepMetrics
from moe_core.live.client import live_client
from moe_core.store.runs import Run
from moe_core.train.control import Control
from moe_core.train.guard import Guard
from tests.conftest import TINY, as_flags, moe_tui
from tests.test_faults import records, wait_until
from tests.test_training import make_trainer


def alerts(control: Control) -> list[Alert]:
    found = []
    while (command := control.next(wait=None)) is not None:
        found.append(command[1])
    return found


def routing(step: int, shares: list[float], entropy: float = 1.0) -> RouterStats:
    return RouterStats(step, [LayerRouting(shares, 0.0, entropy)])


def steps(step: int, loss: float, tokens_per_sec: float = 1000.0) -> StepMetrics:
    return StepMetrics(step, loss, 1.0, 1.0, 1e-3, 1.0, tokens_per_sec, float(step))


def test_each_rule_trips_once_per_streak_and_not_on_healthy_figures():
    control = Control()
    guard = Guard(Config(log_interval=10, eval_interval=100), control, "pause")
    healthy = [0.3, 0.3, 0.2, 0.2]
    for i in range(1, 21):  # noise, but every expert busy and the router choosing
        guard(steps(10 * i, 2.0 - 0.01 * i, 1000 + 30 * (i % 3)))
        guard(routing(10 * i, healthy, entropy=1.2))
    assert alerts(control) == []

    for i in range(21, 31):  # expert 3 fades out for 10 log lines: one alert, where the streak began
        guard(routing(10 * i, [0.4, 0.3, 0.299, 0.001], entropy=1.2))
    (dead,) = alerts(control)
    assert (dead.rule, dead.action, dead.since) == ("dead_expert", "pause", 200)
    assert "expert 3 of layer 0" in dead.message
    for i in range(31, 35):  # healthy again, but for fewer than guard_windows log lines: still tripped
        guard(routing(10 * i, healthy, entropy=1.2))
    assert "dead_expert/0/3" in guard.tripped
    guard(routing(350, healthy, entropy=1.2))  # the fifth: back to normal, the rule may trip again later
    assert "dead_expert/0/3" not in guard.tripped

    for i in range(36, 40):  # a confident router (low entropy per token) that uses every expert: healthy
        guard(routing(10 * i, healthy, entropy=0.1))
    assert alerts(control) == []
    for i in range(40, 45):  # the tokens go to one expert: the load's entropy far under ln 4
        guard(routing(10 * i, [0.97, 0.01, 0.01, 0.01], entropy=1.2))
    rules = [a.rule for a in alerts(control)]
    assert sorted(rules) == ["collapse", "dead_expert", "dead_expert", "dead_expert"]

    guard(steps(410, 9.0))  # 4.5x the running mean
    assert [(a.rule, a.action) for a in alerts(control)] == [("loss_spike", "pause")]
    for i in range(42, 62):  # step times about the threshold, slow at every other log line: noise
        guard(steps(10 * i, 1.8, tokens_per_sec=300 if i % 2 else 1000))
    assert alerts(control) == []
    for i in range(62, 72):  # 3.5x slower per step than the median, for 10 log lines: one alert
        guard(steps(10 * i, 1.8, tokens_per_sec=300))
    (slow,) = alerts(control)
    assert (slow.rule, slow.action, slow.since) == ("slow_step", "warn", 600)  # the streak began with line 610
    for i in range(72, 82):  # flapping: still tripped; then five log lines at the usual speed rearm it
        guard(steps(10 * i, 1.8, tokens_per_sec=300 if i % 2 else 1000))
    for i in range(82, 87):
        guard(steps(10 * i, 1.8))
    for i in range(87, 92):  # slow again for five lines: a new alert
        guard(steps(10 * i, 1.8, tokens_per_sec=300))
    assert [a.rule for a in alerts(control)] == ["slow_step"]

    for step, val in ((100, 2.0), (200, 2.1), (300, 2.2), (430, 2.3)):
        guard(EvalMetrics(step, 1.5, val, 0.0))
    (rising,) = alerts(control)
    assert rising.rule == "val_rising" and "2.3000" in rising.message


def test_a_pausing_alert_keeps_the_last_checkpoint_from_before_the_streak(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=100_000, ckpt_interval=10, eval_interval=100_000,
                           sample_interval=100_000)  # fmt: skip
    step = trainer.step

    def step_then_trip():
        step()
        if trainer.step_num == 35:
            trainer.control.alert(Alert(35, "dead_expert", "expert 1 of layer 0 is dead", "pause", since=25))

    trainer.step = step_then_trip
    thread = threading.Thread(target=trainer.run)
    thread.start()
    wait_until(lambda: trainer.state == "paused", 60, "the guard's pause")
    assert trainer.step_num == 35
    kept = trainer.run_folder.checkpoints / "last-good"
    assert json.loads((kept / "manifest.json").read_text())["step"] == 20  # the newest from before step 25
    trainer.control.stop()
    thread.join(timeout=60)
    log = [json.loads(line) for line in trainer.run_folder.metrics_path.read_text().splitlines()]
    assert [r["rule"] for r in log if r["event"] == "Alert"] == ["dead_expert"]


# The recipe of docs/steering.md: eight experts, no balancing loss, a learning rate ten times too high.
DYING = {**TINY, "batch_size": 32, "num_experts": 8, "aux_loss_coef": 0, "lr": 0.03, "warmup_iters": 10,
         "max_iters": 100_000, "eval_interval": 100_000, "sample_tokens": 0, "ckpt_interval": 50,
         "log_interval": 10}  # fmt: skip


def test_the_guard_pauses_a_run_whose_experts_die_and_a_set_brings_them_back(tmp_path):
    runs = tmp_path / "runs"
    assert moe_tui(runs, "train", "simpsons", *as_flags(DYING), "--run-name", "dying", "--detach").returncode == 0
    run, folder = Run.open(runs, "dying"), runs / "dying"
    try:
        wait_until(lambda: records(folder, "Alert"), 120, "the guard to trip")
        (alert,) = records(folder, "Alert")
        assert alert["rule"] == "dead_expert" and alert["action"] == "pause"  # detached: pause by default
        found = re.search(r"expert (\d+) of layer (\d+)", alert["message"])
        expert, layer = int(found[1]), int(found[2])
        wait_until(lambda: live_client(run).hello["state"] == "paused", 30, "the run to pause")
        assert moe_tui(runs, "set", "dying", "aux_loss_coef=0.1", "lr=0.003").returncode == 0
        client = live_client(run)
        client.send("resume")
        client.close()

        def revived() -> bool:
            shares = [r["layers"][layer]["expert_fraction"][expert] for r in records(folder, "RouterStats")]
            return shares[-1] > 0.1 / 8  # back over the guard's line for a dead expert

        wait_until(revived, 120, "the dead expert to take tokens again")
    finally:
        moe_tui(runs, "stop", "dying")
