"""Every bad input moe-tui handles: one line on stderr naming the problem and the fix, exit code 2,
no traceback, and nothing on disk changed.

docs/bad-input.md is the table of these cases with what moe-tui really says; each test checks its
row there, so the table cannot drift. After changing a message, regenerate it with
`python -m tests.test_bad_input` (it runs every case). Since the table comes from the same code,
OFFENDING says apart from it what each message must name: the value given, and a fix.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from moe_core.errors import UserError
from moe_core.parallel import ranks as distributed
from moe_core.store.checkpoint import MANIFEST_FILE, MODEL_FILE, STATE_FILE, file_digest
from tests.conftest import REPO, TINY_FLAGS, shared_data_dir, tree
from tui.cli import main

DOC = REPO / "docs" / "bad-input.md"
SHORT = ["--max-iters", "5", "--headless"]


@dataclass(frozen=True)
class Case:
    area: str
    args: list[str]  # {tmp} stands for the test folder; a finished run 'tiny' is in {tmp}/runs
    setup: Callable[[Path, Path], None] | None = None  # (the run 'tiny', the test folder)
    env: dict[str, str] | None = None  # set for the command, which then runs as a process of its own

    def command(self) -> str:
        env = "".join(
            f"{key}={shlex.quote(value).replace('{tmp}', '<tmp>')} " for key, value in (self.env or {}).items()
        )
        return (
            env
            + "moe-tui "
            + " ".join(shlex.quote(a).replace("'{tmp}", "'<tmp>").replace("{tmp}", "<tmp>") for a in self.args)
        )


# -- what some cases do to the run first ------------------------------------------------------------


def corrupt_best(run: Path, tmp: Path) -> None:
    model = run / "checkpoints" / "best" / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-10])


def corrupt_every_step_checkpoint(run: Path, tmp: Path) -> None:
    for folder in (run / "checkpoints").glob("step-*"):
        model = folder / MODEL_FILE
        model.write_bytes(model.read_bytes()[:-10])


def delete_checkpoints(run: Path, tmp: Path) -> None:
    shutil.rmtree(run / "checkpoints")


class Payload:
    """A pickle that would create a file if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def plant_a_pickle(run: Path, tmp: Path) -> None:
    """Replace the newest state.pt with a pickled object, and rewrite the manifest to match."""
    folder = sorted((run / "checkpoints").glob("step-*"))[-1]
    with open(folder / STATE_FILE, "wb") as f:
        pickle.dump({"step": Payload()}, f)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = {
        "size": (folder / STATE_FILE).stat().st_size,
        "sha256": file_digest(folder / STATE_FILE),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def corrupt_vocab(run: Path, tmp: Path) -> None:
    (run / "vocab.json").write_text("{ not json")


OTHER_TRAINERS: list[subprocess.Popen] = []  # stopped after each case (see the fixture below)


def other_trainer(mode: str) -> Callable[[Path, Path], None]:
    """A setup that makes the run 'tiny' live under a trainer this moe-tui cannot talk to."""

    def setup(run: Path, tmp: Path) -> None:
        holder = subprocess.Popen(
            [sys.executable, "-m", "tests.other_trainer", str(run), mode, "120"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        OTHER_TRAINERS.append(holder)
        assert holder.stdout.readline().strip() == "ready"

    return setup


@pytest.fixture(autouse=True)
def stop_other_trainers() -> Iterator[None]:
    yield
    while OTHER_TRAINERS:
        holder = OTHER_TRAINERS.pop()
        holder.kill()
        holder.wait()


def not_a_run(run: Path, tmp: Path) -> None:
    (tmp / "runs" / "notes").mkdir()
    (tmp / "runs" / "notes" / "todo.txt").write_text("not a run\n")


def hide_mlflow(run: Path, tmp: Path) -> None:
    """A folder that, first on PYTHONPATH, makes `import mlflow` fail as it does where it is not installed."""
    (tmp / "no-mlflow" / "mlflow").mkdir(parents=True)
    (tmp / "no-mlflow" / "mlflow" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n"
    )


def write_inputs(tmp: Path) -> None:
    """The bad files the corpus and config cases point at."""
    files = {
        "empty.txt": "",
        "short.txt": "Homer: Doh!\n",
        "latin1.txt": "Moe's caf\xe9 is closed.\n".encode("latin-1") * 100,
        "lines.csv": "speaker,line\nHomer,Doh\n",
        "bad.toml": "n_layer = = 2\n",
        "unknown.toml": "n_layers = 2\n",
        "wrongtype.toml": 'n_layer = "two"\n',
        "negative.toml": "[train]\nlr = -1.0\n",
        "section.toml": "[modell]\nn_layer = 2\n",
        "runs-file": "not a folder\n",
        "tracker.toml": '[tracking]\ntrack = ["neptune"]\n',
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
    (tmp / "corpus-folder").mkdir(exist_ok=True)


CLI, CONFIG, CORPUS, RUN, CKPT, PROMPT, LIVE, TRACK, PROBE = (
    "CLI arguments",
    "config files",
    "corpora",
    "run names",
    "checkpoints",
    "prompts",
    "watching and stopping",
    "experiment tracking",
    "probing",
)
CASES = {
    "n_embd not divisible by n_head": Case(CLI, ["train", "simpsons", "--n-embd", "100", "--n-head", "8", *SHORT]),
    "rope with an odd head width": Case(
        CLI, ["train", "simpsons", "--pos-encoding", "rope", "--n-embd", "36", "--n-head", "4", *SHORT]
    ),
    "unknown position encoding": Case(CLI, ["train", "simpsons", "--pos-encoding", "alibi", *SHORT]),
    "top_k above num_experts": Case(CLI, ["train", "simpsons", "--num-experts", "2", "--top-k", "3", *SHORT]),
    "zero layers": Case(CLI, ["train", "simpsons", "--n-layer", "0", *SHORT]),
    "negative batch size": Case(CLI, ["train", "simpsons", "--batch-size", "-4", *SHORT]),
    "negative capacity factor": Case(CLI, ["train", "simpsons", "--capacity-factor", "-1", *SHORT]),
    "zero learning rate": Case(CLI, ["train", "simpsons", "--lr", "0", *SHORT]),
    "negative learning rate": Case(CLI, ["train", "simpsons", "--lr", "-0.1", *SHORT]),
    "validation share of 1.5": Case(CLI, ["train", "simpsons", "--val-fraction", "1.5", *SHORT]),
    "keep no checkpoints": Case(CLI, ["train", "simpsons", "--keep-checkpoints", "0", *SHORT]),
    "unknown router": Case(CLI, ["train", "simpsons", "--router", "softmax", *SHORT]),
    "unknown preset": Case(CLI, ["train", "simpsons", "--preset", "huge", *SHORT]),
    # No GPU visible, so that this holds on a machine that has one.
    "no CUDA": Case(CLI, ["train", "simpsons", "--device", "cuda", *SHORT], env={"CUDA_VISIBLE_DEVICES": ""}),
    "not an integer": Case(CLI, ["train", "simpsons", "--n-layer", "two", *SHORT]),
    "unknown flag": Case(CLI, ["train", "simpsons", "--layers", "2", *SHORT]),
    "resume and overwrite": Case(CLI, ["train", "--resume", "tiny", "--overwrite", *SHORT]),
    "resume with another shape": Case(CLI, ["train", "--resume", "tiny", "--n-layer", "3", *SHORT]),
    "resume with another dataset": Case(CLI, ["train", "shakespeare", "--resume", "tiny", *SHORT]),
    "bench with no steps": Case(CLI, ["bench", "--steps", "0"]),
    "no processes": Case(CLI, ["train", "simpsons", "--nproc", "0", *SHORT]),
    "a batch that does not split over the processes": Case(
        CLI, ["train", "simpsons", "--batch-size", "30", "--nproc", "4", *SHORT]
    ),
    "several processes outliving their terminal": Case(
        CLI, ["train", "simpsons", "--nproc", "2", "--on-hangup", "keep", *SHORT]
    ),
    "config file missing": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/none.toml", *SHORT]),
    "config file not TOML": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/bad.toml", *SHORT]),
    "config file unknown key": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/unknown.toml", *SHORT]),
    "config file unknown section": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/section.toml", *SHORT]),
    "config file wrong type": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/wrongtype.toml", *SHORT]),
    "config file bad value": Case(CONFIG, ["train", "simpsons", "--config", "{tmp}/negative.toml", *SHORT]),
    "unknown dataset": Case(CORPUS, ["train", "nosuch", *SHORT]),
    "missing corpus file": Case(CORPUS, ["train", "{tmp}/missing.txt", *SHORT]),
    "a folder as corpus": Case(CORPUS, ["train", "{tmp}/corpus-folder", *SHORT]),
    "empty corpus": Case(CORPUS, ["train", "{tmp}/empty.txt", *SHORT]),
    "too-short corpus": Case(CORPUS, ["train", "{tmp}/short.txt", *SHORT]),
    "non-UTF-8 corpus": Case(CORPUS, ["train", "{tmp}/latin1.txt", *SHORT]),
    "unknown CSV column": Case(CORPUS, ["train", "{tmp}/lines.csv", "--column", "nope", *SHORT]),
    "unreachable URL": Case(CORPUS, ["train", "http://127.0.0.1:9/corpus.txt", *SHORT]),
    "run name with a slash": Case(RUN, ["train", "simpsons", "--run-name", "a/b", *SHORT]),
    "run name ..": Case(RUN, ["train", "simpsons", "--run-name", "..", *SHORT]),
    "run name with a space": Case(RUN, ["train", "simpsons", "--run-name", "my run", *SHORT]),
    "existing run name": Case(RUN, ["train", "simpsons", "--run-name", "tiny", *SHORT]),
    "runs folder is a file": Case(RUN, ["train", "simpsons", "--runs-dir", "{tmp}/runs-file", *SHORT]),
    "resume unknown run": Case(RUN, ["train", "--resume", "ghost", *SHORT]),
    "sample unknown run": Case(RUN, ["sample", "ghost"]),
    "sample a corrupt best": Case(CKPT, ["sample", "tiny", "--checkpoint", "best"], corrupt_best),
    "resume with every checkpoint corrupt": Case(
        CKPT, ["train", "--resume", "tiny", *SHORT], corrupt_every_step_checkpoint
    ),
    "sample a run with no checkpoint": Case(CKPT, ["sample", "tiny"], delete_checkpoints),
    "a pickle in state.pt": Case(CKPT, ["sample", "tiny"], plant_a_pickle),
    "unknown checkpoint name": Case(CKPT, ["sample", "tiny", "--checkpoint", "oldest"]),
    "corrupt vocab.json": Case(CKPT, ["sample", "tiny"], corrupt_vocab),
    "prompt outside the vocabulary": Case(PROMPT, ["sample", "tiny", "--prompt", "Ω≈"]),
    "empty prompt": Case(PROMPT, ["sample", "tiny", "--prompt", ""]),
    "negative temperature": Case(PROMPT, ["sample", "tiny", "--temperature", "-1"]),
    "negative length": Case(PROMPT, ["sample", "tiny", "--max-new-tokens", "-1"]),
    "top-k of 0": Case(PROMPT, ["sample", "tiny", "--top-k", "0"]),
    "top-p above 1": Case(PROMPT, ["sample", "tiny", "--top-p", "1.5"]),
    "no samples": Case(PROMPT, ["sample", "tiny", "--num-samples", "0"]),
    "unknown --on-hangup": Case(LIVE, ["train", "simpsons", "--on-hangup", "ignore", *SHORT]),
    "watch unknown run": Case(LIVE, ["watch", "ghost"]),
    "stop unknown run": Case(LIVE, ["stop", "ghost"]),
    "watch a folder that is not a run": Case(LIVE, ["watch", "notes"], not_a_run),
    "stop a folder that is not a run": Case(LIVE, ["stop", "notes"], not_a_run),
    "watch with no runs": Case(LIVE, ["watch", "--runs-dir", "{tmp}/corpus-folder"]),
    "watch without a terminal": Case(LIVE, ["watch", "tiny"]),
    "resume a run that is training": Case(LIVE, ["train", "--resume", "tiny", *SHORT], other_trainer("live")),
    "overwrite a run that is training": Case(
        LIVE, ["train", "simpsons", "--run-name", "tiny", "--overwrite", *SHORT], other_trainer("live")
    ),
    "detach onto a run that is training": Case(LIVE, ["train", "--resume", "tiny", "--detach"], other_trainer("live")),
    "watch another user's run": Case(LIVE, ["watch", "tiny"], other_trainer("other-user")),
    "stop another user's run": Case(LIVE, ["stop", "tiny"], other_trainer("other-user")),
    "watch a trainer of another version": Case(LIVE, ["watch", "tiny"], other_trainer("other-protocol")),
    "stop a trainer of another version": Case(LIVE, ["stop", "tiny"], other_trainer("other-protocol")),
    "report in an unknown format": Case(RUN, ["report", "tiny", "--format", "pdf"]),
    "report on an unknown run": Case(RUN, ["report", "ghost"]),
    "unknown tracker": Case(TRACK, ["train", "simpsons", "--track", "neptune", *SHORT]),
    # No bytecode written: the case must leave its folder as it found it.
    "tracker package not installed": Case(
        TRACK,
        ["train", "simpsons", "--track", "mlflow", *SHORT],
        hide_mlflow,
        env={"PYTHONPATH": "{tmp}/no-mlflow", "PYTHONDONTWRITEBYTECODE": "1"},
    ),
    "unknown tracker in a config file": Case(TRACK, ["train", "simpsons", "--config", "{tmp}/tracker.toml", *SHORT]),
    "empty tracker project": Case(
        TRACK, ["train", "simpsons", "--track", "tensorboard", "--track-project", "", *SHORT]
    ),
    "resume with an unknown tracker": Case(TRACK, ["train", "--resume", "tiny", "--track", "neptune", *SHORT]),
    "export to an unknown tracker": Case(TRACK, ["export", "tiny", "--to", "neptune"]),
    "export an unknown run": Case(TRACK, ["export", "ghost", "--to", "tensorboard"]),
    "export a run that is training": Case(TRACK, ["export", "tiny", "--to", "tensorboard"], other_trainer("live")),
    "expert parallelism on one process": Case(CLI, ["train", "simpsons", "--expert-parallel", *SHORT]),
    "experts that do not split over the processes": Case(
        CLI,
        ["train", "simpsons", "--num-experts", "4", "--nproc", "3", "--batch-size", "30", "--expert-parallel", *SHORT],
    ),
    "expert parallelism with the textbook experts": Case(
        CLI, ["train", "simpsons", "--moe-impl", "reference", "--nproc", "2", "--expert-parallel", *SHORT]
    ),
    "expert parallelism compiled": Case(
        CLI, ["train", "simpsons", "--compile", "--nproc", "2", "--expert-parallel", *SHORT]
    ),
    "export with an empty tracker project": Case(
        TRACK, ["export", "tiny", "--to", "tensorboard", "--track-project", ""]
    ),
    "set without KEY=VALUE": Case(LIVE, ["set", "tiny", "lr"]),
    "set an unknown setting": Case(LIVE, ["set", "tiny", "learning_rate=1e-3"]),
    "set a setting that changes the model": Case(LIVE, ["set", "tiny", "n_layer=3"]),
    "set a value train would refuse": Case(LIVE, ["set", "tiny", "dropout=1.5"]),
    "set a setting to a word": Case(LIVE, ["set", "tiny", "lr=fast"]),
    "set a run that is not training": Case(LIVE, ["set", "tiny", "lr=1e-3"]),
    "set an unknown run": Case(LIVE, ["set", "ghost", "lr=1e-3"]),
    "fork an unknown run": Case(RUN, ["train", "--fork", "ghost", *SHORT]),
    "fork a step with no checkpoint": Case(RUN, ["train", "--fork", "tiny@15", *SHORT]),
    "fork with a setting that changes the model": Case(RUN, ["train", "--fork", "tiny@20", "--n-layer", "3", *SHORT]),
    "fork onto another dataset": Case(RUN, ["train", "shakespeare", "--fork", "tiny", *SHORT]),
    "fork and resume at once": Case(RUN, ["train", "--fork", "tiny", "--resume", "tiny", *SHORT]),
    "fork spelled wrong": Case(RUN, ["train", "--fork", "tiny@latest", *SHORT]),
    "unknown --on-alert": Case(CLI, ["train", "simpsons", "--on-alert", "panic", *SHORT]),
    "unknown --guard": Case(CLI, ["train", "simpsons", "--guard", "maybe", *SHORT]),
    "negative dropout": Case(CLI, ["train", "simpsons", "--dropout", "-0.1", *SHORT]),
    "negative weight decay": Case(CLI, ["train", "simpsons", "--weight-decay", "-0.01", *SHORT]),
    "negative gradient clip": Case(CLI, ["train", "simpsons", "--grad-clip", "-1", *SHORT]),
    "unknown init": Case(CLI, ["train", "simpsons", "--init", "orthogonal", *SHORT]),
    "unknown learning rate schedule": Case(CLI, ["train", "simpsons", "--lr-schedule", "linear", *SHORT]),
    "unknown device": Case(CLI, ["train", "simpsons", "--device", "tpu", *SHORT]),
    "probe text the model never saw": Case(PROBE, ["probe", "tiny", "--text", "Moe€"]),
    "probe an expert the model lacks": Case(PROBE, ["probe", "tiny", "--mask", "1:9"]),
    "probe with fewer experts left than top-k": Case(PROBE, ["probe", "tiny", "--mask", "1:0,1:1,1:2"]),
    "probe a mask spelled wrong": Case(PROBE, ["probe", "tiny", "--mask", "x:1"]),
    "probe a mask with a superscript digit": Case(PROBE, ["probe", "tiny", "--mask", "1:²"]),
    "probe a checkpoint step with a superscript": Case(
        PROBE, ["probe", "tiny", "--text", "a", "--checkpoint", "step-²"]
    ),
    "probe nothing": Case(PROBE, ["probe", "tiny"]),
    "probe a layer the model lacks": Case(PROBE, ["probe", "tiny", "--text", "a", "--layer", "9"]),
    "probe a step with no checkpoint": Case(PROBE, ["probe", "tiny", "--text", "a", "--checkpoint", "step-15"]),
    "probe --text and --file at once": Case(PROBE, ["probe", "tiny", "--text", "a", "--file", "{tmp}/text.txt"]),
    "probe a file that is not there": Case(PROBE, ["probe", "tiny", "--file", "{tmp}/missing.txt"]),
    "probe with top-k 0": Case(PROBE, ["probe", "tiny", "--top-k", "0"]),
    "probe with a negative capacity": Case(PROBE, ["probe", "tiny", "--capacity-factor", "-1"]),
}


@contextmanager
def user_session(tmp: Path) -> Iterator[None]:
    """As a user in `tmp` would run it: that folder current, the offline corpora, runs in tmp/runs."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(MOE_TUI_DATA=str(shared_data_dir()), MOE_TUI_RUNS=str(tmp / "runs"))
    os.chdir(tmp)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_case(name: str, tmp: Path, trained: Path) -> tuple[int, str, str, dict]:
    """Run one case against a private copy of the run 'tiny': exit code, stdout, stderr, and the
    files under `tmp` before it ran."""
    case = CASES[name]
    write_inputs(tmp)
    shutil.copytree(trained, tmp / "runs" / "tiny")
    if case.setup:
        case.setup(tmp / "runs" / "tiny", tmp)
    before = tree(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if case.env:  # a process of its own: torch reads CUDA_VISIBLE_DEVICES once, when it first looks for a GPU
        with user_session(tmp):
            env = {key: value.replace("{tmp}", str(tmp)) for key, value in case.env.items()}
            done = subprocess.run(
                [sys.executable, "-m", "tui", *args],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=300,
            )
        return done.returncode, done.stdout, done.stderr, before
    out, err = io.StringIO(), io.StringIO()
    with user_session(tmp), redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue(), before


def row(number: int, name: str, stderr: str, tmp: Path) -> str:
    message = stderr.strip()
    # Paths as given and as resolved (CI reaches the corpora through a symlink).
    for path, placeholder in (
        (tmp, "<tmp>"),
        (tmp.resolve(), "<tmp>"),
        (shared_data_dir(), "<data>"),
        (shared_data_dir().resolve(), "<data>"),
    ):
        message = message.replace(str(path), placeholder)
    message = re.sub(r"process \d+", "process <pid>", message)  # the other trainer's, new each time
    cells = [str(number), CASES[name].area, name, f"`{CASES[name].command()}`", message.replace("|", "\\|")]
    return "| " + " | ".join(cells) + " |"


def outside(tmp: Path) -> dict:
    """What a case must not change outside its own folder (which is its current directory): the corpora
    folder, and the directory the tests were started from, where a stray `runs/`, `data/` or `urls/`
    would land (its entries, and its own runs/ and data/ whole)."""
    start = Path.cwd()
    assert start != tmp
    return {
        "corpora": contents(shared_data_dir()),
        "entries": sorted(p.name for p in start.iterdir()),
        "runs": contents(start / "runs"),
        "data": contents(start / "data"),
    }


def contents(path: Path) -> dict:
    """Like `tree`, but a folder counts by its presence only: a temporary file made and removed in it
    changes its mtime and nothing else."""
    return {name: "folder" if (path / name).is_dir() else stat for name, stat in tree(path).items()}


# -- what each message must name, written down apart from docs/bad-input.md (which these same cases
# generate): the value the user got wrong, as the message shows it ({tmp} is the case's folder) ...
OFFENDING = {
    "n_embd not divisible by n_head": ["--n-embd 100", "--n-head 8"],
    "rope with an odd head width": ["--pos-encoding rope", "--n-embd 36", "--n-head 4"],
    "unknown position encoding": ["'alibi'"],
    "top_k above num_experts": ["--top-k 3", "--num-experts 2"],
    "zero layers": ["--n-layer", "got 0"],
    "negative batch size": ["--batch-size", "got -4"],
    "negative capacity factor": ["--capacity-factor", "got -1.0"],
    "zero learning rate": ["--lr", "got 0.0"],
    "negative learning rate": ["--lr", "got -0.1"],
    "validation share of 1.5": ["--val-fraction", "got 1.5"],
    "keep no checkpoints": ["--keep-checkpoints", "got 0"],
    "unknown router": ["'softmax'"],
    "unknown preset": ["'huge'"],
    "no CUDA": ["--device cuda"],
    "not an integer": ["--n-layer", "'two'"],
    "unknown flag": ["--layers"],
    "resume and overwrite": ["--resume", "--overwrite"],
    "resume with another shape": ["'tiny'", "n_layer"],
    "resume with another dataset": ["'tiny'", "dataset"],
    "bench with no steps": ["--steps", "got 0"],
    "no processes": ["--nproc", "got 0"],
    "a batch that does not split over the processes": ["--batch-size 30", "4 processes"],
    "several processes outliving their terminal": ["--on-hangup keep"],
    "config file missing": ["{tmp}/none.toml"],
    "config file not TOML": ["{tmp}/bad.toml", "line 1"],
    "config file unknown key": ["{tmp}/unknown.toml", "'n_layers'"],
    "config file unknown section": ["{tmp}/section.toml", "[modell]"],
    "config file wrong type": ["{tmp}/wrongtype.toml", "'two'"],
    "config file bad value": ["--lr", "got -1.0"],
    "unknown dataset": ["'nosuch'"],
    "missing corpus file": ["{tmp}/missing.txt"],
    "a folder as corpus": ["{tmp}/corpus-folder"],
    "empty corpus": ["{tmp}/empty.txt"],
    "too-short corpus": ["12 characters", "--block-size 64"],
    "non-UTF-8 corpus": ["{tmp}/latin1.txt", "byte 0xe9"],
    "unknown CSV column": ["{tmp}/lines.csv", "'nope'"],
    "unreachable URL": ["http://127.0.0.1:9/corpus.txt"],
    "run name with a slash": ["'a/b'"],
    "run name ..": ["'..'"],
    "run name with a space": ["'my run'"],
    "existing run name": ["'tiny'"],
    "runs folder is a file": ["{tmp}/runs-file"],
    "resume unknown run": ["'ghost'"],
    "sample unknown run": ["'ghost'"],
    "sample a corrupt best": ["{tmp}/runs/tiny/checkpoints/best"],
    "resume with every checkpoint corrupt": ["'tiny'", "step-00000030"],
    "sample a run with no checkpoint": ["'tiny'"],
    "a pickle in state.pt": ["step-00000030", "state.pt"],
    "unknown checkpoint name": ["'oldest'"],
    "corrupt vocab.json": ["{tmp}/runs/tiny/vocab.json"],
    "prompt outside the vocabulary": ["'Ω', '≈'"],
    "empty prompt": ["prompt is empty"],
    "negative temperature": ["--temperature", "got -1.0"],
    "negative length": ["--max-new-tokens", "got -1"],
    "top-k of 0": ["--top-k", "got 0"],
    "top-p above 1": ["--top-p", "got 1.5"],
    "no samples": ["--num-samples", "got 0"],
    "unknown --on-hangup": ["--on-hangup", "'ignore'"],
    "watch unknown run": ["'ghost'"],
    "stop unknown run": ["'ghost'"],
    "watch a folder that is not a run": ["{tmp}/runs/notes"],
    "stop a folder that is not a run": ["{tmp}/runs/notes"],
    "watch with no runs": ["{tmp}/corpus-folder"],
    "watch without a terminal": ["needs a terminal"],
    "resume a run that is training": ["'tiny'", "by process"],
    "overwrite a run that is training": ["'tiny'", "by process"],
    "detach onto a run that is training": ["'tiny'", "by process"],
    "watch another user's run": ["{tmp}/runs/tiny/control/socket", "user id 65534"],
    "stop another user's run": ["{tmp}/runs/tiny/control/socket", "user id 65534"],
    "watch a trainer of another version": ["moe-tui 9.9.9", "protocol 99"],
    "stop a trainer of another version": ["moe-tui 9.9.9", "protocol 99"],
    "report in an unknown format": ["--format", "'pdf'"],
    "report on an unknown run": ["'ghost'"],
    "unknown tracker": ["'neptune'", "--track"],
    "tracker package not installed": ["--track mlflow", "pip install 'moe-tui[mlflow]'"],
    "unknown tracker in a config file": ["'neptune'"],
    "empty tracker project": ["--track-project"],
    "resume with an unknown tracker": ["'neptune'", "--track"],
    "export to an unknown tracker": ["'neptune'", "--to"],
    "export an unknown run": ["'ghost'"],
    "export a run that is training": ["'tiny'"],
    "export with an empty tracker project": ["--track-project"],
    "expert parallelism on one process": ["--expert-parallel", "--nproc N"],
    "experts that do not split over the processes": ["--num-experts 4", "3 processes"],
    "expert parallelism with the textbook experts": ["--moe-impl reference", "--moe-impl fast"],
    "expert parallelism compiled": ["--compile", "--expert-parallel"],
    "set without KEY=VALUE": ["'lr'", "KEY=VALUE"],
    "set an unknown setting": ["'learning_rate'"],
    "set a setting that changes the model": ["n_layer"],
    "set a value train would refuse": ["--dropout", "1.5"],
    "set a setting to a word": ["lr", "'fast'"],
    "set a run that is not training": ["'tiny'", "not training"],
    "set an unknown run": ["'ghost'"],
    "fork an unknown run": ["'ghost'"],
    "fork a step with no checkpoint": ["'tiny'", "step 15", "tiny@10"],
    "fork with a setting that changes the model": ["--n-layer"],
    "fork onto another dataset": ["dataset"],
    "fork and resume at once": ["--resume", "--fork"],
    "fork spelled wrong": ["'tiny@latest'"],
    "unknown --on-alert": ["--on-alert", "'panic'"],
    "unknown --guard": ["--guard", "'maybe'"],
    "negative dropout": ["--dropout", "got -0.1"],
    "negative weight decay": ["--weight-decay", "got -0.01"],
    "negative gradient clip": ["--grad-clip", "got -1.0"],
    "unknown init": ["'orthogonal'"],
    "unknown learning rate schedule": ["'linear'"],
    "unknown device": ["'tpu'"],
    "probe text the model never saw": ["'€'"],
    "probe an expert the model lacks": ["expert 9", "layer 1"],
    "probe with fewer experts left than top-k": ["3 of 4", "layer 1", "--top-k 1"],
    "probe a mask spelled wrong": ["'x:1'"],
    "probe a mask with a superscript digit": ["'1:²'"],
    "probe a checkpoint step with a superscript": ["'step-²'"],
    "probe nothing": ["--text"],
    "probe a layer the model lacks": ["--layer", "got 9"],
    "probe a step with no checkpoint": ["step-15", "step-10"],
    "probe --text and --file at once": ["--text", "--file"],
    "probe a file that is not there": ["{tmp}/missing.txt"],
    "probe with top-k 0": ["--top-k", "got 0"],
    "probe with a negative capacity": ["--capacity-factor", "got -1.0"],
}

# ... and a fix: a flag to change, a command to run, a file to look at, or the values to choose from.
FIX = re.compile(
    r"--[a-z][a-z-]+|`moe-tui [a-z]|moe-tui (train|sample|runs)|/\S|\w\.(json|toml|txt|csv|pt)\b"
    r"|one of |valid keys: |available columns: |`pip install "
)


def check_names_value_and_fix(name: str, message: str, tmp: Path) -> None:
    assert name in OFFENDING, f"write down in OFFENDING what the message of case {name!r} must name"
    missing = [part for part in OFFENDING[name] if part.replace("{tmp}", str(tmp)) not in message]
    assert not missing, f"the message does not name {missing}: {message}"
    assert FIX.search(message), f"the message names no fix (a flag, a file, a command, the choices): {message}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_exit_2_and_changes_nothing(name, trained_once, tmp_path):
    outside_before = outside(tmp_path)
    code, out, err, before = run_case(name, tmp_path, trained_once)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err + out
    assert tree(tmp_path) == before, "a failed command changed files on disk"
    assert outside(tmp_path) == outside_before, "a failed command changed files outside its folder"
    check_names_value_and_fix(name, err, tmp_path)
    assert not (tmp_path / "pwned").exists()
    documented = DOC.read_text(encoding="utf-8").splitlines()
    assert row(list(CASES).index(name) + 1, name, err, tmp_path) in documented, (
        "docs/bad-input.md does not show this message: regenerate it with `python -m tests.test_bad_input`"
    )


def test_the_table_has_one_row_per_case():
    rows = [
        line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ") and line[2:3].isdigit()
    ]
    assert len(rows) == len(CASES) + len(ELSEWHERE) and len(CASES) >= 25


# Cases this machine cannot run end to end (they need GPUs, or a second kind of device): their rows
# hold what the check that refuses them says (tests/test_distributed.py runs those checks).
ELSEWHERE = {
    "more processes than CUDA GPUs": (
        "several processes",
        "moe-tui train simpsons --device cuda --nproc 4  # on a machine with 2 GPUs",
        lambda: distributed.check_cuda_count(4, 2),
    ),
    "processes on different devices": (
        "several processes",
        "torchrun ... -m tui train simpsons --device cuda  # machine 0; machine 1: --device cpu",
        lambda: distributed.check_same_devices(["cuda", "cpu"]),
    ),
}


def elsewhere_row(number: int, name: str) -> str:
    area, command, check = ELSEWHERE[name]
    with pytest.raises(UserError) as refused:
        check()
    return "| " + " | ".join([str(number), area, name, f"`{command}`", f"error: {refused.value}"]) + " |"


def test_the_cases_this_machine_cannot_run_show_what_their_checks_say():
    documented = DOC.read_text(encoding="utf-8").splitlines()
    for number, name in enumerate(ELSEWHERE, len(CASES) + 1):
        assert elsewhere_row(number, name) in documented, (
            "docs/bad-input.md does not show this message: regenerate it with `python -m tests.test_bad_input`"
        )


HEADER = """# Bad input

Every mistake below gets one line on stderr that names the problem and the fix, exit code 2, no
traceback, and no change to anything on disk. Each row is a test (`tests/test_bad_input.py`) that
runs the command and checks that this is exactly what it prints; `<tmp>` is the folder the command
runs in, where a finished run `tiny` exists. Regenerate the table with `python -m tests.test_bad_input`.

| # | area | case | command | what moe-tui says |
|---|---|---|---|---|
"""


ELSEWHERE_HEADER = """
Two more cases need hardware the test machine lacks (several GPUs, or a second kind of device). Their
rows show what the check that refuses them says (`moe_core/parallel/ranks.py`; `tests/test_distributed.py`
runs the checks); on such a machine the command prints it as one line and exits 2 like the rest.

| # | area | case | command | what moe-tui says |
|---|---|---|---|---|
"""


def write_doc() -> None:
    """Run every case and write docs/bad-input.md from what moe-tui really printed."""
    with tempfile.TemporaryDirectory() as scratch:
        runs = Path(scratch) / "trained"
        with redirect_stdout(io.StringIO()):
            assert (
                main(
                    [
                        "train",
                        "simpsons",
                        *TINY_FLAGS,
                        "--max-iters",
                        "30",
                        "--ckpt-interval",
                        "10",
                        "--eval-interval",
                        "10",
                        "--run-name",
                        "tiny",
                        "--headless",
                        "--data-dir",
                        str(shared_data_dir()),
                        "--runs-dir",
                        str(runs),
                    ]
                )
                == 0
            )
        rows = []
        for number, name in enumerate(CASES, 1):
            tmp = Path(scratch) / f"case-{number}"
            tmp.mkdir()
            code, _, err, _ = run_case(name, tmp, runs / "tiny")
            if code != 2:
                print(f"warning: case '{name}' exited {code}: {err.strip()}", file=sys.stderr)
            rows.append(row(number, name, err, tmp))
    elsewhere = [elsewhere_row(number, name) for number, name in enumerate(ELSEWHERE, len(CASES) + 1)]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(HEADER + "\n".join(rows) + "\n" + ELSEWHERE_HEADER + "\n".join(elsewhere) + "\n", encoding="utf-8")
    print(f"wrote {DOC} ({len(rows)} rows)")


if __name__ == "__main__":
    write_doc()
