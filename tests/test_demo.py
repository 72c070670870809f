"""`helios-deploy demo`: it says the checkpoint is a tiny model trained on procedural videos, shows what the
prompt asks (the adherence line), keeps third-party output
(warnings, logging, progress bars, C++ and child-process output) out of the terminal and in the log it names,
and writes a strip PNG that holds the video's frames."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

# Lines only third-party code prints here: warnings, tqdm bars, torch.onnx's exporter, diffusers/transformers.
THIRD_PARTY_MARKERS = ("Warning", "warn(", "it/s]", "%|", "[torch.onnx]", "Loading", "Writing model shards",
                       "deprecate(", "ffmpeg", "from-child-process", "from-fd-2", "from-print", "from-logging")


def _third_party_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if any(m in line for m in THIRD_PARTY_MARKERS)]


def test_third_party_output_goes_to_the_log(tmp_path, capfd):
    """Every kind of third-party output lands in the log; only what `say` writes reaches the terminal, and
    the terminal is the terminal again afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from helios_deploy.quiet import third_party_to_log

    log = tmp_path / "run.log"
    with third_party_to_log(log) as say:
        say("our line 1")
        warnings.warn("from-python-warnings FutureWarning", FutureWarning, stacklevel=1)
        hf_logging.get_logger("transformers.modeling_utils").warning("from-logging (transformers)")
        diffusers_logging.get_logger("diffusers.pipelines").warning("from-logging (diffusers)")
        for _ in tqdm(range(3), desc="from-tqdm"):
            pass
        print("from-print")
        sys.stdout.flush()
        os.write(2, b"from-fd-2 (what C++ writes)\n")
        subprocess.run([sys.executable, "-c", "import sys; print('from-child-process'); "
                        "print('from-child-process stderr', file=sys.stderr)"], check=True)
        say("our line 2")
    print("after the block")
    captured = capfd.readouterr()
    assert captured.out.splitlines() == ["our line 1", "our line 2", "after the block"]
    assert captured.err == ""
    text = log.read_text()
    for expected in ["our line 1", "from-python-warnings", "from-logging (transformers)",
                     "from-logging (diffusers)", "from-tqdm", "3/3",
                     "from-print", "from-fd-2", "from-child-process", "from-child-process stderr", "our line 2"]:
        assert expected in text, f"{expected!r} not in the log:\n{text}"
    assert text.index("our line 1") < text.index("from-print") < text.index("our line 2")


def test_third_party_to_log_restores_on_error(tmp_path, capfd):
    from helios_deploy.quiet import third_party_to_log

    with pytest.raises(RuntimeError):
        with third_party_to_log(tmp_path / "run.log"):
            print("inside")
            raise RuntimeError("boom")
    print("outside")
    assert capfd.readouterr().out == "outside\n"
    assert "inside" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_demo_output_strip_and_log(trained_demo):
    """The whole demo as `make demo` runs it (trained tiny checkpoint, audited export, mp4, strip, adherence,
    pipeline parity): `helios-deploy demo` in a child process, run once per session (trained_demo; its export
    is the session's trained_artifacts)."""
    from PIL import Image

    from helios_deploy.demo import DEMO_PROMPT, STRIP_GAP, strip_layout
    from helios_deploy.runtime import Pipeline
    from helios_deploy.runtime.video_io import read_video

    out, report = trained_demo["out"], trained_demo["report"]
    terminal = trained_demo["stdout"] + trained_demo["stderr"]
    assert trained_demo["returncode"] == 0 and report is not None, terminal
    assert "TINY Helios-Distilled" in terminal and "trained on CPU" in terminal and "not Helios's quality" in terminal
    assert f"(asked: {DEMO_PROMPT}):" in terminal  # what the video shows against the prompt
    assert report["adherence"]["demo"]["match"] and report["adherence"]["share"]["share"] >= 0.9  # colour and direction
    assert "adherence: " in terminal and "over 20 prompts" in terminal
    assert str(out / "demo.log") in terminal
    assert _third_party_lines(terminal) == [], terminal
    log = (out / "demo.log").read_text()
    assert _third_party_lines(log), "the libraries printed nothing? then the check above proves nothing"
    assert all(line in log for line in trained_demo["stdout"].splitlines())

    video = read_video(out / "demo.mp4")  # [T, H, W, 3] as ffmpeg decodes the mp4
    strip_path = out / "demo-strip.png"
    strip = np.asarray(Image.open(strip_path).convert("RGB"))
    shown = strip_layout(len(video))
    assert report["strip"] == {"path": str(strip_path), "frames": shown} and len(shown) == 6
    t, h, w, _ = video.shape
    assert strip.shape == (h, len(shown) * (w + STRIP_GAP) - STRIP_GAP, 3)
    # The runtime's frames for the same request, uint8 as written to the mp4 (before H.264's loss).
    pipe = Pipeline.from_artifacts(out / "artifacts")
    frames = np.concatenate([c.frames for c in pipe.stream(DEMO_PROMPT, num_frames=66, seed=0)])
    assert frames.shape == video.shape
    for i, f in enumerate(shown):
        left = i * (w + STRIP_GAP)
        tile = strip[:, left:left + w].astype(np.int16)
        np.testing.assert_array_equal(tile, frames[f])
        # Against the mp4 as decoded: close to its own frame (the frames are mostly black, so not told apart by this)
        diff = np.abs(tile - video[f]).mean()
        assert diff < 30, f"tile {i} is not frame {f} of the mp4: {diff}"
        if i:
            assert (strip[:, left - STRIP_GAP:left] == 255).all(), "the gap between tiles is not white"


def test_a_handler_made_inside_the_block_writes_to_stderr_after_it(tmp_path, capfd):
    """A library that sets up its console handler while the block runs (imported there) binds the log; after
    the block it writes to stderr, not to the closed log."""
    import logging
    import sys

    from helios_deploy.quiet import third_party_to_log

    name = "helios_deploy_test.made_inside"
    with third_party_to_log(tmp_path / "run.log"):
        handler = logging.StreamHandler()  # binds sys.stderr as it is now: the log
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).warning("inside")
    try:
        logging.getLogger(name).warning("after the block")
        assert handler.stream is sys.stderr
        assert "after the block" in capfd.readouterr().err
        assert "inside" in (tmp_path / "run.log").read_text()
    finally:
        logging.getLogger(name).removeHandler(handler)
