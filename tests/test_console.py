"""What a user sees: the CLI's ranks print one start-up summary and the step lines, none of the known-harmless
library warnings; the project's own warnings still show; --verbose shows the libraries' again."""

import subprocess
import sys

from megatron_refine.warnings import LIBRARY_LOG_RECORDS, LIBRARY_WARNINGS, filterwarnings_lines


def _train(corpus, *extra):
    args = [sys.executable, "-m", "megatron_refine.cli", "train", "--config", "tiny-deltanet", "--nproc", "2",
            "--set", f"data.path={corpus}", "--set", "data.seq_length=64", "--set", "data.micro_batch_size=2",
            "--set", "data.global_batch_size=4", "--set", "train_steps=2", "--set", "logging.log_interval=1",
            "--set", "optimizer.warmup_steps=0", "--set", "device=cpu", *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def test_two_ranks_print_one_summary_the_steps_and_no_library_warnings(corpus, tmp_path):
    # pretraining that saves a checkpoint, then a REFINE run from its weights with a log-prob parity tolerance
    # of 0: the project's own warning must come through
    saving = _train(corpus, "--set", f"checkpoint.save={tmp_path / 'ntp'}")
    out = _train(corpus, "--stage", "refine-mid", "--set", "refine.n_chunks=2", "--set", "refine.margin=5",
                 "--set", "refine.k=3", "--set", "refine.logprob_parity_tolerance=0",
                 "--set", f"checkpoint.load={tmp_path / 'ntp'}", "--set", "checkpoint.finetune=true")
    for message, _, _ in LIBRARY_WARNINGS:
        assert not message or message not in saving + out, message
    for _, message in LIBRARY_LOG_RECORDS:
        assert message not in saving + out, message
    assert "WARNING" not in saving + out and "Warning: " not in saving
    assert "Warning: " not in out.replace("RuntimeWarning: step", "")  # nothing but the project's warning
    assert out.count("megatron-refine train (refine-mid):") == 1 and "  layout " in out
    assert "step     1/2" in out and "step     2/2" in out
    assert "RuntimeWarning: step 1: rollout log-probs of the decoder and the training forward differ" in out


def test_verbose_shows_the_library_warnings_again(corpus):
    out = _train(corpus, "--verbose")
    assert any(message and message in out for message, _, _ in LIBRARY_WARNINGS[:4]), out[-2000:]


def test_the_suite_filters_the_same_list():
    import warnings

    assert len(filterwarnings_lines()) == len(LIBRARY_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:  # pytest applied them: a listed warning is ignored here
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("a warning of this project", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of this project"]
