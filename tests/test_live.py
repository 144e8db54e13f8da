"""Training that outlives its terminal, watched and controlled from elsewhere: real detached trainer
processes, the real control socket, viewers driven with Textual's Pilot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from moe_core.data.vocab import Vocab
from moe_core.events import Notice, Probed
from moe_core.live.client import live_client
from moe_core.live.follow import RunFollower
from moe_core.live.lease import is_live, process_gone, read_status, socket_path
from moe_core.live.protocol import MAX_LINE, SUN_PATH_MAX, ProtocolError, parse_command
from moe_core.model.sampling import SampleRequest
from moe_core.probe.request import Intervention, ProbeRequest
from moe_core.store.runs import Run
from tests.conftest import QUIET_FLAGS, TINY, TINY_FLAGS, moe_tui
from tests.test_dashboard import SIZE, drive, fast_keys, status_text, wait_until  # noqa: F401 - a fixture
from tui.dashboard.app import Dashboard


def wait_for(condition, timeout: float = 60.0, what: str = "the condition") -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def logged_steps(run: Run) -> list[int]:
    return [r["step"] for r in run.read_metrics() if r.get("event") == "StepMetrics"]


@pytest.fixture
def trainers():
    """PIDs of detached trainers started by a test; whatever is left of them is killed afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def detach(runs: Path, name: str, trainers: list[int], *extra: str) -> Run:
    """`moe-tui train simpsons --detach`, as a user types it; returns once the parent has returned."""
    done = moe_tui(runs, "train", "simpsons", "--run-name", name, "--detach", *TINY_FLAGS, *QUIET_FLAGS, *extra)
    assert done.returncode == 0, done.stderr
    pid = int(re.search(r"as process (\d+)", done.stdout)[1])
    trainers.append(pid)
    assert f"moe-tui watch {name}" in done.stdout and f"moe-tui stop {name}" in done.stdout
    run = Run(runs / name)
    assert "train.log" in done.stdout and run.path.joinpath("train.log").is_file()
    return run


# -- the wire protocol -----------------------------------------------------------------------------


def test_the_control_protocol_accepts_its_verbs_and_refuses_everything_else():
    vocab = Vocab.from_text("abc \n")
    assert parse_command(b'{"v": 1, "cmd": "pause"}', vocab) == ("pause", None)
    verb, request = parse_command(b'{"v": 1, "cmd": "sample", "prompt": "ab", "max_new_tokens": 5}', vocab)
    assert verb == "sample" and request == SampleRequest("ab", 5)
    for line, says in [
        (b"pause", "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (b'{"v": 2, "cmd": "pause"}', "protocol version 2"),
        (b'{"v": 1, "cmd": "rm -rf /"}', "unknown command"),
        (b'{"v": 1, "cmd": "sample", "prompt": "xyz"}', "does not know"),
        (b'{"v": 1, "cmd": "sample", "prompt": "a", "max_new_tokens": "9"}', "wrong type"),
        (b'{"v": 1, "cmd": "sample", "prompt": "a", "max_new_tokens": 10000000}', "at most"),
        (b'{"v": 1, "cmd": "sample", "prompt": "a", "temperature": -1}', "temperature"),
        (b'{"v": 1, "cmd": "sample", "prompt": "a", "seed": 18446744073709551616}', "--seed"),
        (b"[" * 5000, "not a JSON object"),  # nested past the parser's recursion limit
        (b"\xff\xfe", "not a JSON object"),
    ]:
        with pytest.raises(ProtocolError, match=re.escape(says)):
            parse_command(line, vocab)


# -- finished runs, watched from their files -------------------------------------------------------


def test_a_finished_run_is_watched_from_its_files_and_sampled_here(trained, fast_keys):
    run = Run(trained)  # 30 steps, evaluated at 10, 20 and 30

    async def scenario():
        follower = RunFollower(run)
        follower.attach()
        assert not follower.live
        app = Dashboard(sources=[follower])
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "finished")
            assert app.view.step == 30 and len(app.view.eval_val.points(None)[0]) == 3
            assert app.screen.check_action("pause", ()) is None and app.screen.check_action("sample", ())
            follower.sample(SampleRequest("Bart:", 20, temperature=0.0))
            await wait_until(pilot, lambda: any(s.requested for s in app.view.samples))
            assert next(s for s in app.view.samples if s.requested).text.startswith("Bart:")

    drive(scenario)


def test_several_runs_overlay_their_validation_curves(two_trained, fast_keys):
    async def scenario():
        followers = [RunFollower(Run(path)) for path in two_trained]
        app = Dashboard(sources=followers)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: all(m.state == "finished" for m in app.views))
            chart = app.query_one("#loss-chart")
            assert "● tiny" in chart.border_subtitle and "■ slower" in chart.border_subtitle
            text = str(chart.render())
            assert "●" in text and "■" in text
            assert "[1/2] tiny" in status_text(app)
            await pilot.press("n")
            assert "[2/2] slower" in status_text(app)
            await pilot.press("x")
            assert "by time" in chart.border_title

    drive(scenario)


def test_a_key_adds_a_run_to_the_chart(two_trained, fast_keys):
    first, second = two_trained
    from tui.dashboard.runner import viewer_app

    async def scenario():
        app = viewer_app([RunFollower(Run(first))], first.parent)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "finished")
            await pilot.press("a", *"ghost", "enter")  # not a run: said in the dialog, which stays open
            assert "no run 'ghost'" in str(app.screen.query_one("#add-run-error").content)
            await pilot.press(*["backspace"] * 5, *second.name, "enter")
            await wait_until(pilot, lambda: len(app.sources) == 2 and app.view.state == "finished")
            assert "[2/2] slower" in status_text(app)
            assert "● tiny" in app.query_one("#loss-chart").border_subtitle

    drive(scenario)


# -- detach, stop, resume, kill --------------------------------------------------------------------


class Stopped(NamedTuple):
    run: Run
    pid: int
    second: subprocess.CompletedProcess  # a second trainer, refused while the first one trained
    stop: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Stopped:
    """A detached run past its first checkpoint, a second trainer refused, then `moe-tui stop`."""
    runs, pids = tmp_path_factory.mktemp("stopped"), []
    try:
        run = detach(runs, "twice", pids, "--ckpt-interval", "20")
        wait_for(lambda: any(run.checkpoints.glob("step-*")), what="a checkpoint")
        second = moe_tui(runs, "train", "--resume", "twice", "--detach", timeout=120)
        stop = moe_tui(runs, "stop", "twice", timeout=120)
        yield Stopped(run, pids[0], second, stop)
    finally:
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_saves_the_last_step_and_returns_once_the_process_is_gone(stopped):
    run, out = stopped.run, stopped.stop.stdout
    assert stopped.stop.returncode == 0, stopped.stop.stderr
    status = read_status(run)
    assert status.state == "stopped" and not is_live(run)
    assert process_gone(stopped.pid)
    assert f"at step {status.step}" in out and f"step-{status.step:08d}" in out
    assert run.checkpoint("latest").name == f"step-{status.step:08d}"  # the last step, saved
    assert not socket_path(run).exists()
    again = moe_tui(run.path.parent, "stop", "twice", timeout=60)
    assert again.returncode == 0 and "is not running (stopped" in again.stderr


def test_resuming_detached_continues_the_run_and_refuses_a_second_trainer(stopped, trainers):
    run, err = stopped.run, stopped.second.stderr
    assert stopped.second.returncode == 2 and "is being trained by process" in err and err.count("\n") == 1
    assert stopped.stop.returncode == 0
    stopped_at = read_status(run).step
    resumed = moe_tui(run.path.parent, "train", "--resume", "twice", "--detach", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    trainers.append(int(re.search(r"as process (\d+)", resumed.stdout)[1]))
    wait_for(lambda: logged_steps(run)[-1] > stopped_at + 10, what="the resumed run's steps")
    steps = logged_steps(run)  # read once: the run goes on logging
    assert steps == sorted(set(steps))  # each step once


def test_a_trainer_killed_with_sigkill_shows_as_gone_within_seconds(env, trainers, fast_keys):
    run = detach(env, "doomed", trainers)
    detected: list[float] = []

    async def scenario():
        follower = RunFollower(run)
        follower.attach()
        app = Dashboard(sources=[follower])
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "running" and app.view.step > 5)
            os.kill(trainers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            await wait_until(pilot, lambda: app.view.state == "gone", timeout=10)
            detected.append(time.monotonic() - killed_at)
            banner = str(app.query_one("#error-banner").content)
            assert f"process {trainers[0]} gone at step" in banner
            assert "resume with: moe-tui train --resume doomed" in banner
            assert "GONE" in status_text(app)

    drive(scenario)
    print(f"\na killed trainer was shown as gone after {detected[0]:.2f} s")
    assert read_status(run).state == "crashed"


# -- one detached trainer, shared by the tests that only talk to it (last: it trains until the end)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Run:
    """One detached trainer for the tests that only talk to it (each leaves it training), in a runs folder
    so deep that its socket's path is past the Unix limit: every test here goes through the long path."""
    pids: list[int] = []
    deep = tmp_path_factory.mktemp("live") / ("d" * 60) / ("e" * 60)
    try:
        run = detach(deep, "deep", pids)
        assert len(os.fsencode(socket_path(run))) > SUN_PATH_MAX
        yield run
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def training_goes_on(run: Run, steps: int = 10, timeout: float = 60) -> None:
    before = max(logged_steps(run), default=0)
    wait_for(lambda: max(logged_steps(run), default=0) >= before + steps, timeout, "training to go on")


def test_a_detached_run_is_watched_paused_sampled_and_left_running(shared, fast_keys):
    run = shared
    assert read_status(run).state == "live" and not process_gone(read_status(run).pid)
    wait_for(lambda: len(logged_steps(run)) >= 3, what="steps before the viewer attaches")

    async def scenario():
        follower = RunFollower(run)
        follower.attach()
        app = Dashboard(sources=[follower])
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.view.state == "running" and app.view.usage is not None)
            first_point = app.view.train_loss.points(None)[0][0]
            assert first_point == 5  # the whole history from the run folder, not only what followed
            assert "deep · simpsons · cpu" in status_text(app) and "cpu " in status_text(app)  # the trainer's usage

            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.state == "paused")
            stopped = logged_steps(run)[-1]
            # Two heartbeats (one a second) from the paused trainer: alive, its step counter standing still.
            beats = []
            for _ in range(3):
                last = app.view.usage
                await wait_until(pilot, lambda: app.view.usage is not last)
                beats.append(app.view.usage.step)
            assert logged_steps(run)[-1] == stopped, "a step was logged while paused"
            assert beats[1] == beats[2] and beats[2] - stopped < 5

            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.state == "running" and logged_steps(run)[-1] > stopped)

            await pilot.press("s")
            await pilot.press("end", "ctrl+u", *"Homer:", "tab", "end", "ctrl+u", "2", "5", "enter")
            await wait_until(pilot, lambda: any(s.requested for s in app.view.samples))
            sample = next(s for s in app.view.samples if s.requested)
            assert sample.text.startswith("Homer:") and len(sample.text) == 6 + 25
            await pilot.press("q")  # a viewer leaves at once: nothing of its own to save
        assert app.return_code == 0

    drive(scenario)
    assert "Homer:" in run.samples_path.read_text()  # the trainer sampled it and logged it to the run
    training_goes_on(run)
    assert is_live(run)


def test_two_viewers_see_what_either_does(shared):
    viewers = {"one": RunFollower(shared), "two": RunFollower(shared)}
    seen: dict[str, list[str]] = {name: [] for name in viewers}
    for viewer in viewers.values():
        viewer.attach()

    def last_seen(name: str) -> str | None:
        for viewer_name, viewer in viewers.items():  # both read their channel, as both screens would
            seen[viewer_name].extend(e.state for e in viewer.poll() if hasattr(e, "state"))
        return seen[name][-1] if seen[name] else None

    wait_for(lambda: last_seen("one") == last_seen("two") == "running", 30, "both viewers' greetings")
    for sender, other, verb, state in (("one", "two", "pause", "paused"), ("two", "one", "resume", "running")):
        viewers[sender].command(verb)
        wait_for(lambda: last_seen(other) == state, 30, f"{sender}'s {verb} to reach viewer {other}")
        assert last_seen(sender) == state  # the sender sees it too
    for viewer in viewers.values():
        viewer.close()
    training_goes_on(shared)


def test_viewers_probe_the_live_weights_and_each_takes_its_own_answer(shared):
    """Two viewers probe at once over the control channel: the trainer answers each between two steps, from
    its weights as they are, and each answer goes to its asker alone."""
    viewers = {"one": RunFollower(shared), "two": RunFollower(shared)}
    heard: dict[str, list[Probed]] = {name: [] for name in viewers}
    warnings: list[str] = []
    for viewer in viewers.values():
        viewer.attach()
    asked = {
        "one": ProbeRequest(text="Homer", intervention=Intervention(((0, 1),)), request_id=11),
        "two": ProbeRequest(text="Marge", request_id=22),
    }
    for name, request in asked.items():
        viewers[name].probe(request)
    viewers["one"].probe(ProbeRequest(text="Moe", intervention=Intervention(((0, 99),)), request_id=33))

    def answered() -> bool:
        for name, viewer in viewers.items():
            for event in viewer.poll():
                if isinstance(event, Probed):
                    heard[name].append(event)
                elif isinstance(event, Notice) and name == "one":
                    warnings.append(event.message)
        return all(answers for answers in heard.values()) and any("probe 33 not answered" in w for w in warnings)

    wait_for(answered, 60, "both probes answered, and the third refused")
    for name, request in asked.items():
        assert [(a.request_id, a.text, a.source) for a in heard[name]] == [(request.request_id, request.text, "live")]
        assert len(heard[name][0].experts) == TINY["n_layer"] and len(heard[name][0].experts[0]) == len(request.text)
    changed = heard["one"][0]
    assert changed.changed == "e1 off in layer 1" and changed.val_loss is not None
    assert all(1 not in chosen for chosen in changed.experts[0])  # switched off: no token went to it
    assert "no expert 99 in layer 1" in next(w for w in warnings if "probe 33" in w)
    for viewer in viewers.values():
        viewer.close()
    training_goes_on(shared)
    assert "Probed" not in shared.metrics_path.read_text()  # answers are for the askers, not the history


def test_a_viewer_that_sends_garbage_or_hangs_up_mid_line_never_stalls_training(shared):
    run = shared
    saved_before = set(run.checkpoints.glob("step-*"))
    rude = live_client(run)
    rude.send_raw(b"\x00\x01not json\n")
    rude.send_raw(b'{"v": 1, "cmd": "exec", "args": ["rm", "-rf", "/"]}\n')
    rude.send_raw(b"x" * (MAX_LINE + 10))  # no newline yet: refused before it ends
    rude.send_raw(b"y" * 1000 + b'\n{"v": 1, "cmd": "save"}\n')  # the rest of that line, then a good one
    rude.send_raw(b"[" * 50_000 + b"\n")  # nested past the parser's recursion limit
    replies = []
    wait_for(
        lambda: len(replies.extend(m for m in rude.receive() if m["type"] == "reply") or replies) >= 5,
        10,
        "five replies",
    )
    assert [r["ok"] for r in replies[:5]] == [False, False, False, True, False]
    assert "unknown command 'exec'" in replies[1]["error"] and "longer than" in replies[2]["error"]
    half = live_client(run)
    half.send_raw(b'{"v": 1, "cmd": "pau')  # and hangs up mid-line
    half.close()
    rude.close()
    wait_for(lambda: set(run.checkpoints.glob("step-*")) - saved_before, 30, "the good save command to be carried out")
    training_goes_on(run, 20)


def test_a_socket_path_past_the_unix_limit_still_works(shared):
    run = shared
    assert len(os.fsencode(socket_path(run))) > SUN_PATH_MAX
    client = live_client(run)
    assert client is not None and client.hello["run"] == "deep"
    client.close()


def test_a_trainer_that_stops_answering_is_reported_and_recovers(shared):
    run, pid = shared, read_status(shared).pid
    follower = RunFollower(run)
    follower.attach()
    wait_for(lambda: any(getattr(e, "state", None) == "running" for e in follower.poll()), 30, "the greeting")
    os.kill(pid, signal.SIGSTOP)  # alive, but silent: no heartbeat
    try:
        notices = []
        took = wait_for(
            lambda: (
                notices.extend(e for e in follower.poll() if "no word from process" in getattr(e, "message", ""))
                or notices
            ),
            15,
            "the silence notice",
        )
        print(f"\na silent trainer was reported after {took:.1f} s")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert follower.live  # silent is not gone: the connection stands
    training_goes_on(run, 1, 30)
    follower.close()
