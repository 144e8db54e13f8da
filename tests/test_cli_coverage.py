"""What the command line's training and reading flags do, end to end through `moe-tui` in this process,
each on tiny real runs: a flag that stopped reaching the trainer, the sampler, the report or the
tracker would fail here. Runs of a step or a few; the finished run 'tiny' of tests/conftest.py where
one is read."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, TINY_FLAGS, cli

# Only training steps: one validation batch at the end, no periodic evaluation or sample.
QUIET = [*TINY_FLAGS, "--eval-interval", "1000", "--eval-iters", "1", "--sample-tokens", "0", "--headless"]


def train(capsys, name: str, *flags: str, dataset: str = "simpsons") -> str:
    code, out, err = cli(capsys, "train", dataset, *QUIET, "--run-name", name, *flags)
    assert code == 0, err
    return out


def weights(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


def manifest(run, checkpoint: str) -> dict:
    return json.loads((run / "checkpoints" / checkpoint / "manifest.json").read_text())


def test_init_seed_and_weight_decay_on_matrices_only(env, capsys):
    # One step at lr 1e-5, so that the weights are still their initial values to within 1e-5.
    step = ["--max-iters", "1", "--warmup-iters", "0", "--lr-schedule", "constant", "--lr", "1e-5", "--grad-clip", "0"]
    for name, init, seed, decay in [
        ("normal", "normal", "5", "0"),
        ("decayed", "normal", "5", "1000"),
        ("other-seed", "normal", "6", "0"),
        ("xavier", "xavier", "5", "0"),
    ]:
        train(capsys, name, *step, "--init", init, "--seed", seed, "--weight-decay", decay)
    normal, decayed, other_seed, xavier = (
        weights(env / name, 1) for name in ("normal", "decayed", "other-seed", "xavier")
    )

    # AdamW's decay multiplies each matrix by 1 - lr * weight_decay = 0.99 and leaves vectors (biases,
    # LayerNorm) alone: with the same seed, everything else (initial weights, batch, update) is the same.
    matrices = [key for key, value in normal.items() if value.dim() >= 2]
    vectors = [key for key, value in normal.items() if value.dim() < 2]
    assert matrices and vectors
    for key in matrices:
        torch.testing.assert_close(decayed[key], normal[key] * 0.99, atol=1e-6, rtol=0, msg=key)
    for key in vectors:
        assert torch.equal(decayed[key], normal[key]), key
    # Another seed, other initial weights.
    assert not any(torch.equal(other_seed[key], normal[key]) for key in matrices)

    # An expert's first layer, 64 -> 256 wide: normal init has std 0.02; Xavier's uniform one is
    # bounded by sqrt(6 / (64 + 256)), with std bound / sqrt(3).
    w1 = "blocks.0.moe.experts.w1"
    assert normal[w1].std().item() == pytest.approx(0.02, rel=0.1)
    bound = math.sqrt(6 / (64 + 256))
    assert xavier[w1].abs().max().item() <= bound + 1e-5
    assert xavier[w1].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_dense_a_constant_schedule_and_the_checkpoints_kept(env, trained_once, capsys):
    train(
        capsys,
        "dense",
        "--dense",
        *("--max-iters", "6", "--log-interval", "1", "--ckpt-interval", "2"),
        *("--lr-schedule", "constant", "--warmup-iters", "2", "--keep-checkpoints", "2"),
    )
    run = env / "dense"
    # One expert of the same width, which every token uses.
    config = (run / "config.toml").read_text()
    assert "num_experts = 1\n" in config and "top_k = 1\n" in config
    assert weights(run, 6)["blocks.0.moe.experts.w1"].shape[0] == 1
    (started,) = records(run, "RunStarted")
    assert started["params_total"] == started["params_active"]
    # Its shape's hash: the same in each of its checkpoints, another than the sparse run's.
    hashes = {manifest(run, name)["config_hash"] for name in ("step-00000004", "step-00000006")}
    assert len(hashes) == 1 and hashes != {manifest(trained_once, "step-00000030")["config_hash"]}

    # Two steps of linear warmup, then the peak learning rate, constant.
    lr = TINY["lr"]
    assert [r["lr"] for r in records(run, "StepMetrics")] == pytest.approx([lr / 2] + [lr] * 5)
    # The default schedule, cosine, decays after its warmup (20 steps for 'tiny') towards 0.1 x the peak.
    decayed = {r["step"]: r["lr"] for r in records(trained_once, "StepMetrics")}
    assert lr * 0.1 < decayed[30] < decayed[20] <= lr

    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]


def test_grad_clip_and_the_loss_coefficients_change_training(env, capsys):
    # Ten steps of three runs alike but for these flags (the same seed: the same batches); each log line
    # is the mean of five steps.
    steps = ["--max-iters", "10", "--batch-size", "8", "--log-interval", "5", "--warmup-iters", "0"]
    runs = {
        "free": ["--grad-clip", "0", "--aux-loss-coef", "0", "--z-loss-coef", "0"],
        "clipped": ["--grad-clip", "1e-9", "--aux-loss-coef", "0", "--z-loss-coef", "0"],
        "balanced": ["--grad-clip", "0", "--aux-loss-coef", "10", "--z-loss-coef", "1"],
    }
    logged = {}
    for name, flags in runs.items():
        train(capsys, name, *steps, *flags)
        logged[name] = records(env / name, "StepMetrics")
    free, clipped, balanced = logged["free"], logged["clipped"], logged["balanced"]
    # Clipped to a norm of 1e-9, an Adam step is about (1e-9 / gradient norm) / eps of its size: nothing
    # learns, and on the same batches its loss stays far above the free run's.
    assert free[1]["loss"] < free[0]["loss"] - 0.3
    assert clipped[1]["loss"] > free[1]["loss"] + 1.0
    # The router's z-loss and load-balancing loss, weighted in, fall below what the run without them has.
    assert balanced[1]["z_loss"] < free[1]["z_loss"] / 2
    assert balanced[1]["aux_loss"] < free[1]["aux_loss"]


def test_encoding_reads_a_latin_1_corpus(env, tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Moe's caf\xe9 is closed.\n".encode("latin-1") * 100)
    train(capsys, "cafe", "--max-iters", "1", "--encoding", "latin-1", dataset=str(corpus))
    assert json.loads((env / "cafe" / "vocab.json").read_text())["chars"] == sorted(set("Moe's café is closed.\n"))
    assert 'encoding = "latin-1"' in (env / "cafe" / "config.toml").read_text()


def test_presets_seed_and_gpu_on_the_cpu(env, capsys):
    # The seed preset whole, as docs/model.md's table gives it: 9.0M parameters, 2.7M active (65 characters).
    one_step = ["--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0", "--headless"]
    code, out, err = cli(capsys, "train", "shakespeare", "--preset", "seed", "--run-name", "seed", *one_step)
    assert code == 0, err
    assert "| device cpu |" in out.splitlines()[0]
    config = (env / "seed" / "config.toml").read_text()
    for line in (
        "n_layer = 8",
        "n_embd = 128",
        "n_head = 8",
        'pos_encoding = "learned"',
        "num_experts = 8",
        "top_k = 2",
        'router = "noisy_topk"',
        "block_size = 32",
        "batch_size = 16",
        "lr = 0.001",
        'lr_schedule = "constant"',
        "dropout = 0.1",
        "capacity_factor = 1.0",
        "aux_loss_coef = 0.0",
        "z_loss_coef = 0.0",
    ):
        assert f"\n{line}\n" in config, line
    (started,) = records(env / "seed", "RunStarted")
    assert (round(started["params_total"] / 1e6, 1), round(started["params_active"] / 1e6, 1)) == (9.0, 2.7)

    # The gpu preset trains on the CPU too; narrowed here (48 wide, a batch of 2) to take a second.
    narrow = ["--n-embd", "48", "--batch-size", "2"]
    code, out, err = cli(capsys, "train", "simpsons", "--preset", "gpu", *narrow, "--run-name", "gpu", *one_step)
    assert code == 0, err
    assert "| device cpu |" in out.splitlines()[0]
    config = (env / "gpu" / "config.toml").read_text()
    for line in (
        "n_layer = 4",
        "n_head = 6",
        'pos_encoding = "rope"',
        "num_experts = 8",
        'router = "topk"',
        "block_size = 256",
        "lr = 0.003",
        'lr_schedule = "cosine"',
        "warmup_iters = 100",
        "dropout = 0.1",
        "capacity_factor = 0.0",
        "aux_loss_coef = 0.01",
        "z_loss_coef = 0.001",
    ):
        assert f"\n{line}\n" in config, line


def test_sample_top_k_and_top_p(trained, capsys):
    def sample(*flags: str) -> str:
        code, out, err = cli(capsys, "sample", "tiny", "--prompt", "Moe:", "--max-new-tokens", "40", *flags)
        assert code == 0, err
        return out

    greedy = sample("--temperature", "0")
    # Hot sampling with only the likeliest character kept, or the smallest set holding 1e-6 of the mass:
    # the greedy text, whatever the seed.
    assert sample("--temperature", "2", "--top-k", "1", "--seed", "1") == greedy
    assert sample("--temperature", "2", "--top-p", "1e-6", "--seed", "2") == greedy
    assert sample("--temperature", "2", "--seed", "1") != greedy  # without them, it is not


def test_report_as_svg(trained, env, capsys):
    code, out, err = cli(capsys, "report", "tiny", "--format", "svg", "--out", str(env / "pictures"))
    assert code == 0, err
    assert out == f"wrote {env / 'pictures'}\n"
    files = {p.name: p for p in (env / "pictures").iterdir()}
    assert set(files) >= {
        f"{name}.svg" for name in ("loss-linear", "loss-log", "schedule", "tiny-load", "tiny-experts")
    }
    for path in files.values():
        assert ElementTree.parse(path).getroot().tag == "{http://www.w3.org/2000/svg}svg", path.name


def test_export_to_trackio_in_a_project_of_its_choosing(trained, capsys):
    trackio = pytest.importorskip("trackio")
    code, out, err = cli(capsys, "export", "tiny", "--to", "trackio", "--track-project", "elsewhere")
    assert code == 0, err
    assert out.startswith("exported run 'tiny' to trackio: run 'tiny' of project 'elsewhere'")
    entry = json.loads((trained / "trackers.json").read_text())["trackio"]
    assert entry["project"] == "elsewhere" and "tiny" in [r.name for r in trackio.Api().runs("elsewhere")]
    logs = trackio.SQLiteStorage.get_logs("elsewhere", "tiny", run_id=entry["run_id"])
    sent = [(row["step"], row["eval/val_loss"]) for row in logs if "eval/val_loss" in row]
    assert sent == [(r["step"], pytest.approx(r["val_loss"])) for r in records(trained, "EvalMetrics")]
