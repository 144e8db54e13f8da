"""Probing: a text routed through the model, experts switched off, each expert's importance. A planted
router shows its experts in the probe; a masked expert gets no tokens in either implementation; the
importance table is a direct evaluation with each expert off; the CLI, its JSON, the screens and the
engine show the same numbers; and a training step runs none of it."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sys

import pytest
import torch

from moe_core.config import build_config
from moe_core.data.corpus import default_data_dir, load_corpus
from moe_core.data.vocab import Vocab
from moe_core.events import ExpertChars, Probed, Sample, from_record
from moe_core.live.follow import RunFollower
from moe_core.live.protocol import parse_command, probe_arguments
from moe_core.model.moe import ReferenceMoE
from moe_core.model.request import SampleRequest
from moe_core.model.routes import recording_routes
from moe_core.model.transformer import MoETransformer
from moe_core.probe.ablate import EvalSet, importance, val_loss
from moe_core.probe.answer import answer
from moe_core.probe.intervene import intervened
from moe_core.probe.request import Intervention, ProbeRequest
from moe_core.probe.source import SavedModel
from moe_core.probe.trace import trace_text, windows
from moe_core.store.runs import Run
from tests.conftest import TINY, cli
from tests.test_dashboard import EXPERT_CHARS, QUIET, fast_keys, one_torch_thread, recorded_events, wait_until  # noqa: F401
from tests.test_routes import VOWELS, plant_vowels_on_expert_0
from tests.test_training import make_trainer
from tui.dashboard.app import Dashboard
from tui.dashboard.widgets.panels import SamplesPanel
from tui.render.probe import expert_mark

TEXT = "Homer: Marge, the donuts are gone!\nMarge: Oh, Homie."


def body(app) -> str:
    return str(app.screen.query_one("#probe-body").render())


def marks_under(rendered: str, text: str) -> str:
    """The row of expert marks drawn under the text's first row (its first line here)."""
    lines = rendered.splitlines()
    first = text.split("\n")[0]
    row = next((i for i, line in enumerate(lines) if line.startswith(first[:10])), None)
    assert row is not None, rendered
    return lines[row + 1][: len(first)]


def test_a_planted_router_shows_its_experts_in_the_engine_the_cli_and_the_probe_screen(
    tmp_path, shared_dir, fast_keys, capsys, monkeypatch
):
    trainer = make_trainer(tmp_path, shared_dir, name="planted", pos_encoding="rope", eval_iters=4, **QUIET)
    plant_vowels_on_expert_0(trainer)
    routes = trace_text(trainer.model, trainer.vocab, TEXT)
    for char, chosen in zip(TEXT, routes["experts"][0]):
        assert (0 in chosen) == (char in VOWELS), char  # every vowel, and nothing else, went to expert 0
        assert chosen[0] == 0 if char in VOWELS else True  # and first: its gate is the larger
    trainer.save()
    monkeypatch.setenv("MOE_TUI_DATA", str(shared_dir))
    code, out, err = cli(capsys, "probe", "planted", "--runs-dir", str(tmp_path), "--text", TEXT, "--json")
    assert code == 0, err
    table = json.loads(out)
    assert [row["char"] for row in table["chars"]] == list(TEXT)
    assert [row["layers"][0]["experts"] for row in table["chars"]] == routes["experts"][0]
    for row, gates in zip(table["chars"], routes["gates"][1]):
        assert row["layers"][1]["gates"] == pytest.approx(gates, abs=1e-4)
    assert table["chars"][0]["loss"] is None and all(row["loss"] > 0 for row in table["chars"][1:])

    code, out, err = cli(capsys, "probe", "planted", "--runs-dir", str(tmp_path), "--text", TEXT, "--layer", "1")
    assert code == 0, err
    first = TEXT.split("\n")[0]
    assert marks_under(out, TEXT) == "".join(expert_mark(e[0]) for e in routes["experts"][0][: len(first)])

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 2)
            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.state == "paused")
            await pilot.press("p")
            await pilot.press("slash")
            app.screen.query_one("#probe-text").value = TEXT.replace("\n", " ")
            await pilot.press("enter")
            await wait_until(pilot, lambda: "live weights" in body(app) and "probing" not in body(app))
            marks = marks_under(body(app), TEXT)
            for char, mark in zip(TEXT, marks):
                assert (mark == "0") == (char in VOWELS), char

    asyncio.run(scenario())


def reference_twin(model: MoETransformer) -> MoETransformer:
    """The same model with each MoE layer the textbook one (per-expert modules, masked dispatch), same weights."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        fast = block.moe
        block.moe = ReferenceMoE(TINY["n_embd"], fast.num_experts, fast.top_k)
        block.moe.load_state_dict(fast.state_dict())
    return twin.eval()


def tokens_each_expert_ran(model: MoETransformer, x: torch.Tensor) -> list[list[int]]:
    """Per layer, how many rows each expert was run on, counted where the experts run."""
    layers = model.moe_layers()
    ran = [[0] * layer.num_experts for layer in layers]
    handles = []
    for i, layer in enumerate(layers):
        if isinstance(layer.experts, torch.nn.ModuleList):  # reference: one module per expert
            for e, expert in enumerate(layer.experts):

                def count(module, args, out, i=i, e=e):
                    ran[i][e] += args[0].shape[0]

                handles.append(expert.register_forward_hook(count))
        else:  # fast: the rows per expert are the grouped call's third argument

            def count_all(module, args, out, i=i):
                for e, n in enumerate(args[2].tolist()):
                    ran[i][e] += n

            handles.append(layer.experts.register_forward_hook(count_all))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return ran


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_a_masked_expert_receives_no_tokens_in_the_fast_and_the_reference_layer(capacity):
    torch.manual_seed(0)
    config = build_config(None, {}, dict(TINY))
    fast = MoETransformer(config, 65).eval()
    reference = reference_twin(fast)
    x = torch.randint(0, 65, (8, TINY["block_size"]))
    off = Intervention(masked=((0, 1), (1, 3)), capacity_factor=capacity)
    outputs = []
    for model in (fast, reference):
        with intervened(model, off):
            ran = tokens_each_expert_ran(model, x)
            with torch.no_grad():
                outputs.append(model(x, x).logits)
        assert ran[0][1] == 0 and ran[1][3] == 0
        assert all(n > 0 for layer, row in enumerate(ran) for e, n in enumerate(row) if (layer, e) not in off.masked)
        if capacity is not None:  # capacity binds at evaluation too: no expert ran past it
            limit = -(-capacity * x.numel() * TINY["top_k"] // TINY["num_experts"])
            assert max(max(row) for row in ran) <= limit
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=1e-4)
    unchanged = tokens_each_expert_ran(fast, x)
    assert unchanged[0][1] > 0 and unchanged[1][3] > 0  # the block left the model as it was


def test_the_importance_table_is_a_direct_evaluation_with_each_expert_off(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, eval_iters=3, max_iters=20)
    for _ in range(20):
        trainer.step()
    evals = EvalSet(trainer.val_ids, trainer.config, "cpu")
    metrics, _ = trainer.evaluate()
    base, rises = importance(trainer.model, evals)
    assert base == pytest.approx(metrics.val_loss, abs=1e-5)  # the trainer's own validation loss
    assert len(rises) == TINY["n_layer"] and all(len(row) == TINY["num_experts"] for row in rises)
    for layer in range(TINY["n_layer"]):
        for e in range(TINY["num_experts"]):
            direct = val_loss(trainer.model, evals, Intervention(masked=((layer, e),))) - base
            assert rises[layer][e] == pytest.approx(direct, abs=1e-5), (layer, e)
    assert any(abs(v) > 1e-4 for row in rises for v in row)  # switching an expert off changes something


def test_a_training_step_runs_no_probe_code(tmp_path, shared_dir):
    trainer = make_trainer(tmp_path, shared_dir, max_iters=10)
    model = trainer.model
    evals = EvalSet(trainer.val_ids, trainer.config, "cpu")
    answer(model, trainer.vocab, evals, ProbeRequest(text=TEXT, intervention=Intervention(((0, 1),), 1, 1.0)), 0, "t")
    for moe in model.moe_layers():  # nothing left behind by the probe
        assert not moe.router._forward_hooks and not moe.router.gate._forward_hooks
        assert moe.top_k == moe.router.top_k == TINY["top_k"] and moe.probe_capacity_factor == 0.0
    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        trainer.step()
    finally:
        sys.setprofile(None)
    assert any("moe_core/model/moe.py" in name for name in called)  # the profile saw the step
    assert not [name for name in called if "moe_core/probe/" in name or "routes.py" in name]


def test_a_probe_round_trips_the_control_channel_and_long_texts_read_in_overlapping_windows(shared_dir):
    vocab = Vocab.from_text(load_corpus("simpsons", shared_dir).text)
    request = ProbeRequest(text=TEXT, intervention=Intervention(((1, 2), (0, 0)), 1, 1.5), compare=True, request_id=7)
    line = json.dumps({"v": 1, "cmd": "probe", **probe_arguments(request)}).encode()
    assert parse_command(line, vocab) == ("probe", request)
    starts, owner = windows(100, 32)
    assert starts[0] == 0 and starts[-1] + 32 == 100
    for p, w in enumerate(owner):  # each position in its window, with half a block of context or from 0
        assert starts[w] <= p < starts[w] + 32 and (p - starts[w] >= 16 or starts[w] == 0)
        assert all(p - s <= p - starts[w] for s in starts if s <= p < s + 32)  # and no window gives it more
    _, uneven = windows(100, 64)  # a last window off the grid of halves
    assert uneven[68] == 1 and uneven[99] == 2  # 68: 36 characters before it from 32, not 32 from 36


def test_a_long_text_reads_each_characters_route_and_loss_from_one_window(shared_dir):
    torch.manual_seed(0)
    text = load_corpus("simpsons", shared_dir).text[:200]
    vocab = Vocab.from_text(load_corpus("simpsons", shared_dir).text)
    model = MoETransformer(build_config(None, {}, dict(TINY)), len(vocab)).eval()
    traced = trace_text(model, vocab, text)
    ids = torch.tensor(vocab.encode(text))
    starts, owner = windows(len(text), TINY["block_size"])
    for w, start in enumerate(starts):  # each window alone, as the model reads it
        window = ids[start : start + TINY["block_size"]][None]
        with torch.no_grad(), recording_routes(model) as noted:
            logits = model(window, window).logits[0]
        for q in (q for q, o in enumerate(owner) if o == w):
            assert [traced["experts"][layer][q] for layer in range(2)] == [n[0][1][q - start].tolist() for n in noted]
            if q:
                loss = torch.nn.functional.cross_entropy(logits[q - 1 - start], ids[q]).item()
                assert traced["loss"][q] == pytest.approx(loss, abs=1e-4)
    assert traced["loss"][0] is None and len(traced["loss"]) == len(text)


def test_cli_json_runs_show_and_the_viewers_screens_show_the_same_numbers(trained, capsys):
    code, out, err = cli(capsys, "probe", "tiny", "--checkpoint", "best", "--mask", "1:2", "--json", "--text", "Hi")
    assert code == 0, err
    table = json.loads(out)
    saved = SavedModel.load(Run(trained), "best", default_data_dir())
    direct = saved.probe(ProbeRequest(experts=True))
    changed = val_loss(saved.model, saved.evals, Intervention(((0, 2),)))
    assert table["changed"] == "e2 off in layer 1"
    assert table["val_loss"] == pytest.approx(direct.val_loss, abs=1e-6)
    assert table["changed_val_loss"] == pytest.approx(changed, abs=1e-6)
    assert table["changed_val_loss"] - table["val_loss"] == pytest.approx(direct.importance[0][2], abs=1e-5)
    assert table["sample"] != table["changed_sample"] or direct.importance[0][2] == 0

    code, out, err = cli(capsys, "runs", "show", "tiny", "--experts")
    assert code == 0, err
    for layer, rises in enumerate(direct.importance):
        section = out.split(f"layer {layer + 1}/")[1].split("lift, how much")[0]
        shown = [line.split()[2] for line in section.splitlines() if re.match(r"e\d+ ", line)]
        assert shown == [f"{v:+.3f}" for v in rises]

    async def scenario():
        app = Dashboard(sources=[RunFollower(Run(trained))])
        async with app.run_test(size=(120, 60)) as pilot:
            await wait_until(pilot, lambda: app.view.expert_chars is not None)
            await pilot.press("r", "i")
            await wait_until(pilot, lambda: "loss rise" in str(app.screen.query_one("#experts-body").render()))
            screen = str(app.screen.query_one("#experts-body").render())
            rows = [line.split()[2] for line in screen.splitlines() if re.match(r"e\d+ ", line)][
                : len(direct.importance[0])
            ]
            latest = SavedModel.load(Run(trained), "latest", default_data_dir()).probe(ProbeRequest(experts=True))
            assert rows == [f"{v:+.3f}" for v in latest.importance[0]]  # a viewer without a trainer: latest
            await pilot.press("escape", "p", "slash")
            app.screen.query_one("#probe-text").value = "Homer"
            await pilot.press("enter")
            await wait_until(pilot, lambda: "checkpoint latest" in body(app) and "probing" not in body(app))
            probed = SavedModel.load(Run(trained), "latest", default_data_dir()).probe(ProbeRequest(text="Homer"))
            assert marks_under(body(app), "Homer") == "".join(expert_mark(e[0]) for e in probed.experts[0])

    asyncio.run(scenario())


def test_samples_carry_their_experts_and_k_colours_them_layer_by_layer(tmp_path, shared_dir, fast_keys):
    trainer = make_trainer(tmp_path, shared_dir, **QUIET)

    async def scenario():
        app = Dashboard(trainer)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.view.step >= 2)
            await pilot.press("space")
            await wait_until(pilot, lambda: app.view.state == "paused")
            trainer.control.sample(SampleRequest("Homer:", 40))
            await wait_until(pilot, lambda: bool(app.view.samples))
            sample: Sample = app.view.samples[0]
            routes = trace_text(trainer.model, trainer.vocab, sample.text)  # paused: the same weights
            assert sample.experts == [[chosen[0] for chosen in layer] for layer in routes["experts"]]
            assert len(sample.experts) == TINY["n_layer"] and len(sample.experts[0]) == len(sample.text)
            panel = app.query_one(SamplesPanel)
            for layer in range(TINY["n_layer"]):
                await pilot.press("k")
                assert app.view.sample_layer == layer
                await wait_until(pilot, lambda: f"layer {layer + 1} (k)" in str(panel.body.render()))
            await pilot.press("k")
            assert app.view.sample_layer is None

    asyncio.run(scenario())


def test_the_experts_screen_steps_back_through_the_evaluations():
    events = recorded_events() + [from_record(json.loads(line)) for line in EXPERT_CHARS.read_text().splitlines()]
    evaluations = [e for e in events if isinstance(e, ExpertChars)]
    assert len(evaluations) >= 2

    async def scenario():
        app = Dashboard(replay=events)
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.press("r")
            text = lambda: str(app.screen.query_one("#experts-body").render())  # noqa: E731
            assert f"step {evaluations[-1].step}" in text() and "latest evaluation" in text()
            await pilot.press("left_square_bracket")
            assert f"step {evaluations[-2].step}" in text()
            assert f"evaluation {len(evaluations) - 1} of {len(evaluations)}" in text()
            await pilot.press("right_square_bracket")
            assert "latest evaluation" in text()
            await pilot.press("i")  # a recorded stream has no model to ask
            assert "no model to probe" in text()

    asyncio.run(scenario())


def test_a_trainer_answers_a_probe_between_steps_and_keeps_it_out_of_the_runs_history(tmp_path, shared_dir):
    seen = []
    trainer = make_trainer(tmp_path, shared_dir, max_iters=10, sink=seen.append)
    trainer.control.probe(ProbeRequest(text="Hi", request_id=3))
    trainer.control.stop()
    trainer.run()
    answers = [e for e in seen if isinstance(e, Probed)]
    assert [(a.request_id, a.source, a.text) for a in answers] == [(3, "live", "Hi")]
    assert len(answers[0].experts) == TINY["n_layer"]
    assert "Probed" not in trainer.run_folder.metrics_path.read_text()
