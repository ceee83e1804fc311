import json
import os
import signal
import subprocess
import sys
import time

from feedloop.core.checkpoint import WEIGHTS, load_checkpoint, read_manifest
from feedloop.core.pretrain import PretrainConfig, pretrain

SMALL = dict(
    embedding_dim=16,
    hidden_dim=32,
    value_hidden_dim=16,
    batch_size=256,
    eval_samples=20,
    torch_threads=1,
)


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    a = pretrain(
        PretrainConfig(data_dir=tmp_path / "a", epochs=1, resume=False, **SMALL), progress=False
    )
    b = pretrain(
        PretrainConfig(data_dir=tmp_path / "b", epochs=1, resume=False, **SMALL), progress=False
    )
    assert read_manifest(a.checkpoint).files == read_manifest(b.checkpoint).files
    summary = read_manifest(a.checkpoint).training_summary
    assert summary["epochs_run"] == 1 and summary["validation_perplexity"] > 1


class SlowClock:
    """A machine so loaded that every look at the clock finds ten more minutes gone."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 600.0
        return self.now


def test_the_default_policy_does_not_depend_on_how_fast_the_machine_is(tmp_path, monkeypatch):
    # Pretraining once stopped at a 4.5-minute wall-clock budget by default, so a loaded
    # machine built a different, less trained default policy from the same seed.
    assert PretrainConfig().max_minutes is None  # no time budget unless asked for
    config = dict(epochs=3, patience=10, resume=False, **SMALL)
    quiet = pretrain(PretrainConfig(data_dir=tmp_path / "quiet", **config), progress=False)
    monkeypatch.setattr("feedloop.core.pretrain.time", SlowClock())
    loaded = pretrain(PretrainConfig(data_dir=tmp_path / "loaded", **config), progress=False)
    assert read_manifest(loaded.checkpoint).training_summary["epochs_run"] == 3
    assert read_manifest(loaded.checkpoint).files == read_manifest(quiet.checkpoint).files
    assert loaded.summary["stopped_by"] == quiet.summary["stopped_by"] == "epochs"


def test_an_explicit_time_budget_cuts_the_run_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("feedloop.core.pretrain.time", SlowClock())
    config = PretrainConfig(
        data_dir=tmp_path, epochs=3, patience=10, resume=False, max_minutes=5.0, **SMALL
    )
    result = pretrain(config, progress=False)
    assert result.summary["epochs_run"] == 1
    assert result.summary["stopped_by"] == "time budget"
    assert "time budget of 5.0 min reached after epoch 1" in capsys.readouterr().out


RUN = """
import sys
from pathlib import Path
from feedloop.core.pretrain import PretrainConfig, pretrain
pretrain(PretrainConfig(data_dir=Path(sys.argv[1]), epochs=3, patience=10, **{kw}), progress=False)
"""


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    script = RUN.replace("{kw}", repr(SMALL))
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-c", script, str(straight)], check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    state = resumed / "default-policy.pretrain-state.pt"
    proc = subprocess.Popen([sys.executable, "-c", script, str(resumed)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # after at least one epoch's state was saved
    proc.wait()
    assert state.exists() and not (resumed / "default-policy").exists()
    out = subprocess.run(
        [sys.executable, "-c", script, str(resumed)], check=True, capture_output=True, text=True
    )
    assert "resuming after epoch" in out.stdout
    a = read_manifest(straight / "default-policy")
    b = read_manifest(resumed / "default-policy")
    assert a.files[WEIGHTS] == b.files[WEIGHTS]
    assert not state.exists()


def test_the_default_policy_writes_phrases_that_contain_their_keyword(pretrained_checkpoint):
    policy, manifest = load_checkpoint(pretrained_checkpoint)
    summary = manifest.training_summary
    # Measured at temperature 1 on held-out prompts when it was built.
    assert summary["keyword_inclusion_t1"] > 0.5
    assert summary["keyword_inclusion_t1"] > 5 * summary["keyword_inclusion_chance"]
    assert summary["test_perplexity"] < 20
    assert 1_000_000 <= policy.parameter_count() <= 5_000_000
    json.dumps(summary)  # the summary is plain JSON


def test_the_pretrain_command_reports_its_figures(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "feedloop",
            "pretrain",
            "--quiet",
            "--epochs",
            "1",
            "--data-dir",
            str(tmp_path),
            "--hidden-dim",
            "32",
            "--embedding-dim",
            "16",
            "--batch-size",
            "256",
            "--eval-samples",
            "20",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "keyword inclusion at temperature 1" in out.stdout
    assert "stopped by epochs" in out.stdout
    assert (tmp_path / "default-policy" / "manifest.json").exists()
    again = subprocess.run(
        [sys.executable, "-m", "feedloop", "pretrain", "--if-missing", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nothing to do" in again.stdout
    (tmp_path / "default-policy" / "tokenizer.json").write_text("{}")  # stale or damaged
    rebuilt = subprocess.run(
        [
            sys.executable,
            "-m",
            "feedloop",
            "pretrain",
            "--if-missing",
            "--quiet",
            "--epochs",
            "1",
            "--data-dir",
            str(tmp_path),
            "--hidden-dim",
            "32",
            "--embedding-dim",
            "16",
            "--batch-size",
            "256",
            "--eval-samples",
            "20",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "does not verify" in rebuilt.stdout and "wrote" in rebuilt.stdout


def test_a_bad_corpus_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "feedloop",
            "pretrain",
            "--corpus",
            str(bad),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("feedloop pretrain:") and "bad.txt:1" in out.stderr
    assert "Traceback" not in out.stderr
