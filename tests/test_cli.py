"""The `moe-tui` command line, end to end: train, resume, sample, runs, datasets and bench.

Bad input is in test_bad_input.py, signals and crashes in test_faults.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from tests.conftest import TINY_FLAGS, cli


def test_headless_train_prints_progress_and_writes_the_run(trained, trained_once, capsys):
    out = (trained_once.parent / "tiny.stdout").read_text()  # what `moe-tui train --headless` printed
    err = (trained_once.parent / "tiny.stderr").read_text()
    lines = out.splitlines()
    assert lines[0].startswith("training run 'tiny' on simpsons | device cpu |") and "30 steps of" in lines[0]
    assert [line.split("|")[0].split() for line in lines if line.startswith(("step ", "eval "))] == [
        ["step", "10"],
        ["eval", "10"],
        ["step", "20"],
        ["eval", "20"],
        ["step", "30"],
        ["eval", "30"],
    ]
    for step in (10, 20, 30):
        assert f"saved checkpoint at step {step} -> " in out
    assert lines[-1] == "finished"
    assert (
        err == "run tiny finished at step 30; sample from it with: moe-tui sample tiny --runs-dir "
        f"{trained_once.parent}\n"
    )
    run = trained
    assert {p.name for p in run.iterdir()} >= {
        "config.toml",
        "vocab.json",
        "metrics.jsonl",
        "samples.txt",
        "checkpoints",
    }
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best",
        "step-00000010",
        "step-00000020",
        "step-00000030",
    ]
    config = (run / "config.toml").read_text()
    assert "[model]" in config and "n_embd = 64" in config and 'dataset = "simpsons"' in config


def test_headless_output_lines(env, capsys):
    code, out, err = cli(
        capsys,
        "train",
        "simpsons",
        *TINY_FLAGS,
        "--max-iters",
        "20",
        "--eval-interval",
        "10",
        "--run-name",
        "lines",
        "--headless",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("training run 'lines' on simpsons | device cpu |")
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and "tok/s" in steps[0] and "lr " in steps[0] and "loss " in steps[0]
    assert "experts cv " in steps[0] and "drop 0.0%" in steps[0]  # the tiny config is dropless
    evals = [line for line in lines if line.startswith("eval ")]
    assert len(evals) == 2 and "val " in evals[0] and "bits/char" in evals[0]
    assert "moe-tui sample lines" in err


def test_resume_continues_from_the_latest_checkpoint(trained, capsys):
    code, out, err = cli(capsys, "train", "--resume", "tiny", "--max-iters", "40", "--lr", "0.001", "--headless")
    assert code == 0, err
    assert "resuming at step 30" in out
    assert "step     40" in out and "step     10" not in out
    # Safe overrides are allowed, and recorded: in the config and in the metrics log.
    assert "max_iters = 40" in (trained / "config.toml").read_text()
    changed = "resumed from step-00000030 with changed settings: lr 0.003 -> 0.001, max_iters 30 -> 40"
    assert f"info: {changed}" in out
    assert changed in (trained / "metrics.jsonl").read_text()
    noted = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if changed in line]
    assert [record["step"] for record in noted] == [30]  # said at the checkpoint's step, not at 0


def test_sample_streams_text_that_starts_with_the_prompt(trained, capsys):
    code, out, err = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "50", "--seed", "3")
    assert code == 0, err
    assert out.startswith("Moe:") and len(out.rstrip("\n")) >= 50
    again = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "50", "--seed", "3")[1]
    assert again == out  # seeded: reproducible
    code, out, _ = cli(
        capsys,
        "sample",
        "tiny",
        "--prompt",
        "Moe:",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "20",
        "--checkpoint",
        "best",
        "--temperature",
        "0",
    )
    assert code == 0 and out.count("--- sample") == 3


def test_sample_skips_a_corrupt_newest_checkpoint_and_says_so(trained, capsys):
    model = trained / "checkpoints" / "step-00000030" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    code, out, err = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("Moe:")
    assert err.startswith("warning: skipped: checkpoint ") and "step-00000030 is corrupt" in err
    warning, speed = err.rstrip().split("\n")
    assert warning.endswith("using step-00000020, the newest intact one")
    assert re.fullmatch(
        r"sampled 1 x 20 characters in [\d.]+ s on cpu: [\d,]+ characters/s, the first after [\d.]+ ms", speed
    ), speed


def table_row(out: str, first_cell: str) -> list[str]:
    """The cells of the row of a rich table that starts with `first_cell`."""
    for line in out.splitlines():
        cells = [cell.strip() for cell in re.split("[│┃]", line.strip())[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{out}")


def test_runs_and_datasets_listings(trained, shared_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row, whatever the terminal running the tests
    code, out, _ = cli(capsys, "runs")
    assert code == 0
    name, parent, state, dataset, step, best, params, updated = table_row(out, "tiny")
    assert (parent, state, dataset, step) == ("-", "finished", "simpsons", "30/30")
    evals = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert best == f"{min(r['val_loss'] for r in evals if r.get('event') == 'EvalMetrics'):.4f}"
    # Parameters counted from the saved weights: a token uses 2 of each layer's 4 experts.
    with safe_open(trained / "checkpoints" / "best" / "model.safetensors", "pt") as weights:
        sizes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    total = sum(math.prod(shape) for shape in sizes.values())
    idle = sum(math.prod(shape) for key, shape in sizes.items() if ".experts." in key) * 2 // 4
    assert params == f"{total / 1e6:.2f}M ({(total - idle) / 1e6:.2f}M)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", updated)

    code, out, _ = cli(capsys, "runs", "show", "tiny")
    assert code == 0 and "step-00000030" in out and "n_layer = 2" in out
    assert f"parameters {total:,} total, {total - idle:,} active per token" in out

    code, out, _ = cli(capsys, "datasets")
    assert code == 0
    for corpus, filename in (("shakespeare", "tinyshakespeare.txt"), ("simpsons", "moes_tavern_lines.txt")):
        file = shared_dir / filename
        assert table_row(out, corpus)[1:4] == ["yes", f"{file.stat().st_size / 1e6:.2f} MB", str(file)]
    code, out, _ = cli(capsys, "datasets", "--data-dir", str(tmp_path / "empty"))
    assert code == 0
    assert table_row(out, "simpsons")[1] == table_row(out, "shakespeare")[1] == "no (downloads on first use)"


def test_overwrite_replaces_an_existing_run(trained, capsys):
    code, _, err = cli(
        capsys, "train", "simpsons", *TINY_FLAGS, "--max-iters", "10", "--run-name", "tiny", "--overwrite", "--headless"
    )
    assert code == 0, err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["best", "step-00000010"]


def test_csv_columns_train(env, tmp_path, capsys):
    rows = ["raw_character_text,spoken_words"] + [f"Homer Simpson,Line number {i} at Moe's." for i in range(300)]
    rows.insert(5, "Moe Szyslak,")  # an empty value: the row is skipped
    csv = tmp_path / "dialogue.csv"
    csv.write_text("\n".join(rows) + "\n")
    code, out, err = cli(
        capsys,
        "train",
        str(csv),
        "--column",
        "raw_character_text",
        "--column",
        "spoken_words",
        *TINY_FLAGS,
        "--max-iters",
        "10",
        "--headless",
    )
    assert code == 0, err
    (run,) = env.iterdir()
    assert run.name.startswith("dialogue-") and f"training run '{run.name}'" in out
    # The characters it learned are those of the columns joined by ': ', one line a row, the empty row left out
    # (its "Szyslak" would bring z, y, k and l).
    text = "".join(f"Homer Simpson: Line number {i} at Moe's.\n" for i in range(300))
    assert json.loads((run / "vocab.json").read_text())["chars"] == sorted(set(text))


def test_a_checkpoint_from_before_stacked_experts_samples_but_does_not_resume(trained, capsys):
    # Rewrite the latest checkpoint as moe-tui saved it before the experts' weights were stacked:
    # one fc/proj pair per expert, the names the reference layer still uses.
    from moe_core.model.moe import ReferenceMoE
    from moe_core.store.checkpoint import load_checkpoint, save_checkpoint

    folder = trained / "checkpoints" / "step-00000030"
    weights, state, manifest = load_checkpoint(folder)
    for prefix in {key.split("experts.")[0] for key in weights if ".experts." in key}:
        ReferenceMoE.convert_expert_keys(None, weights, prefix)
    assert "blocks.0.moe.experts.3.proj.bias" in weights and "blocks.0.moe.experts.w1" not in weights
    save_checkpoint(folder, weights, state, {k: v for k, v in manifest.items() if k != "files"})

    code, out, err = cli(capsys, "sample", "tiny", "--prompt", "Homer:", "--max-new-tokens", "40", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("Homer:") and len(out.strip()) > len("Homer:")

    before = (trained / "metrics.jsonl").read_bytes()
    code, out, err = cli(capsys, "train", "--resume", "tiny", "--max-iters", "40", "--headless")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "saved by an older moe-tui, with one tensor per expert" in err and "start a new run" in err
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_a_run_from_before_rotary_positions_samples_and_resumes(env, capsys):
    # Runs saved before --pos-encoding existed have no such key, and a learned position table.
    code, _, err = cli(
        capsys,
        "train",
        "simpsons",
        *TINY_FLAGS,
        "--max-iters",
        "10",
        "--eval-interval",
        "10",
        "--pos-encoding",
        "learned",
        "--run-name",
        "old",
        "--headless",
    )
    assert code == 0, err
    config = env / "old" / "config.toml"
    config.write_text(
        "".join(line for line in config.read_text().splitlines(keepends=True) if not line.startswith("pos_encoding"))
    )
    code, out, err = cli(capsys, "sample", "old", "--prompt", "Homer:", "--max-new-tokens", "20")
    assert code == 0, err
    assert out.startswith("Homer:")
    code, out, err = cli(capsys, "train", "--resume", "old", "--max-iters", "20", "--headless")
    assert code == 0, err
    assert "resuming at step 10" in out and "step     20" in out
    assert 'pos_encoding = "learned"' in config.read_text()


def test_bench_json_reports_the_figures_and_the_machine(env, capsys):
    code, out, err = cli(
        capsys, "bench", "--preset", "cpu", "--steps", "1", "--repeats", "1", "--dashboard-steps", "0", "--json"
    )
    assert code == 0, err
    result = json.loads(out)  # stdout holds the JSON alone; progress goes to stderr
    assert "bench: training speed" in err and "bench: sampling speed" in err
    assert result["preset"] == "cpu" and result["device"] == "cpu" and result["compile"] is False
    assert result["train_tokens_per_sec"] > 0 and result["reference_tokens_per_sec"] > 0
    # Counted by hand for the cpu preset (4 layers x 64 wide, block 64, 8 experts, top-2, 65 characters):
    # 6 x the 338,689 weights a token multiplies by (per layer 16,640 attention, 256 LayerNorm, 512 router,
    # 2 x 33,088 of its experts; 4,353 for the final LayerNorm and head), and 12 x 4 x 64 x 64 for attention.
    assert result["flops_per_token"] == 6 * 338_689 + 12 * 4 * 64 * 64
    assert 0 < result["mfu"] < 1 and result["matmul_peak_gflops"] > 0
    # The KV cache computes one token per character where the reference recomputes the whole window.
    assert result["sample_speedup"] > 1 and result["first_char_ms"] > 0
    assert result["dashboard_overhead"] is None  # skipped by --dashboard-steps 0
    machine = result["machine"]
    assert machine["processor"] and machine["capability"] and machine["threads"] >= 1
    assert machine["torch"] == torch.__version__


def test_bench_prints_its_figures_as_a_table(env, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per row, whatever the terminal running the tests
    code, out, err = cli(capsys, "bench", "--preset", "cpu", "--steps", "1", "--repeats", "1", "--dashboard-steps", "0")
    assert code == 0, err
    assert "moe-tui bench: cpu preset on cpu" in out
    assert table_row(out, "measure")[1:] == ["moe-tui", "textbook reference", "ratio"]
    ours, reference, ratio = table_row(out, "training tokens/s")[1:]
    assert re.fullmatch(r"[\d,]+", ours) and re.fullmatch(r"[\d,]+", reference) and ratio.endswith("x")
    # The ratio is of the figures beside it (each rounded as shown).
    shown = int(ours.replace(",", "")) / int(reference.replace(",", ""))
    assert float(ratio[:-1]) == pytest.approx(shown, rel=0.01, abs=0.01)
    mfu = table_row(out, "model FLOPs utilisation")
    assert re.fullmatch(r"\d+\.\d%", mfu[1]) and re.fullmatch(r"of [\d,.]+ GFLOP/s matmul peak", mfu[3])
    ours, reference, ratio = table_row(out, "sampling chars/s")[1:]
    assert re.fullmatch(r"[\d,]+", ours) and re.fullmatch(r"[\d,]+", reference) and ratio.endswith("x")
    assert re.fullmatch(r"[\d.]+ ms", table_row(out, "time to first char")[1])
    assert "dashboard" not in out  # skipped by --dashboard-steps 0
    assert f"{torch.get_num_threads()} torch threads, torch {torch.__version__}" in out
