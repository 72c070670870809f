"""The adherence measure (helios_deploy.measure.adherence, `helios-deploy adherence`) on videos whose content is
known: the procedural videos themselves (as frames, as an mp4 and as a folder of PNGs), a wrong prompt, a
still and a dark video, and a colour change between chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helios_deploy.checkpoints import procedural
from helios_deploy.measure.adherence import adherence_of, analyse, default_prompts, share_of
from tests.conftest import HEIGHT, WIDTH, run_cli


def _uint8(frames):
    return (frames * 255).round().astype(np.uint8)


def test_every_caption_of_the_vocabulary_is_read_back():
    """40 captions x 2 seeds of ground-truth videos: colour, direction and shape all read back."""
    results = []
    for i, text in enumerate(procedural.all_captions()):
        for seed in (0, 1):
            words = procedural.parse_caption(text)
            rng = np.random.default_rng(1000 * i + seed)
            motion = procedural.sample_motion(rng, HEIGHT, WIDTH, chunks=2)
            motion = procedural.Motion(words["shape"], words["direction"], (words["colour"],) * 2, motion.size,
                                       _start(words["direction"], motion.size), motion.speed)
            results.append(adherence_of(_uint8(procedural.render(motion, HEIGHT, WIDTH)), text))
    report = share_of(results)
    assert report["share"] == 1.0 and report["shape_share"] == 1.0, [r for r in results if not r["match"]][:3]


def _start(direction: str, size: float) -> tuple[float, float]:
    """A start from which 66 frames of motion stay inside the frame."""
    dx, dy = procedural.DIRECTIONS[direction]
    x = WIDTH / 2 - dx * WIDTH / 4
    y = HEIGHT / 2 - dy * (HEIGHT / 2 - size - 2)
    return x, y


def test_a_wrong_prompt_does_not_match():
    frames, captions = procedural.video(3, HEIGHT, WIDTH)
    words = procedural.parse_caption(captions[0])
    other_colour = next(c for c in procedural.COLOURS if c != words["colour"])
    other_direction = next(d for d in procedural.DIRECTIONS if d != words["direction"])
    right = adherence_of(frames, captions[0])
    assert right["match"]
    wrong = adherence_of(frames, procedural.caption(other_colour, words["shape"], words["direction"]))
    assert not wrong["match"] and not wrong["colour_match"] and wrong["direction_match"]
    wrong = adherence_of(frames, procedural.caption(words["colour"], words["shape"], other_direction))
    assert not wrong["match"] and wrong["colour_match"] and not wrong["direction_match"]
    assert not adherence_of(frames, "a cat in the snow")["match"]  # names no colour or direction


def test_still_dark_and_noise_videos():
    frames, captions = procedural.video(4, HEIGHT, WIDTH)
    still = np.repeat(frames[:1], 33, axis=0)
    assert analyse(still)["direction"] == "still"
    assert not adherence_of(still, captions[0])["match"]
    dark = analyse(np.zeros((33, HEIGHT, WIDTH, 3), np.uint8))
    assert dark["colour"] is None and dark["frames_with_shape"] == 0
    noise = np.random.default_rng(0).integers(0, 256, (66, HEIGHT, WIDTH, 3), dtype=np.uint8)
    assert analyse(noise)["direction"] == "still"  # the bright pixels' centroid stays in the middle


def test_colour_per_chunk_follows_a_colour_change():
    for seed in range(20):
        motion = procedural.sample_motion(np.random.default_rng(seed), HEIGHT, WIDTH, chunks=3, change_prob=1.0)
        seen = analyse(procedural.render(motion, HEIGHT, WIDTH))
        assert seen["chunk_colours"] == list(motion.colours)


def test_default_prompts_cover_the_vocabulary():
    prompts = default_prompts()
    assert len(set(prompts)) == 20
    words = [procedural.parse_caption(p) for p in prompts]
    for key, vocab in (("colour", procedural.COLOURS), ("shape", procedural.SHAPES),
                       ("direction", procedural.DIRECTIONS)):
        assert {w[key] for w in words} == set(vocab)


def test_cli_on_an_mp4_and_on_frames(tmp_path, capsys):
    from PIL import Image

    from helios_deploy.runtime.video_io import write_mp4

    frames, captions = procedural.video(7, HEIGHT, WIDTH, chunks=2)
    video = tmp_path / "v.mp4"
    write_mp4(video, [_uint8(frames)])
    pngs = tmp_path / "frames"
    pngs.mkdir()
    for i, f in enumerate(_uint8(frames)):
        Image.fromarray(f).save(pngs / f"{i:04d}.png")
    words = procedural.parse_caption(captions[0])
    wrong = procedural.caption(next(c for c in procedural.COLOURS if c != words["colour"]), words["shape"],
                               words["direction"])
    report_path = tmp_path / "a.json"
    code, out, err = run_cli(["adherence", video, pngs, "--prompt", captions[0], "--prompt", wrong,
                              "--json", report_path], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["videos"] == 4 and report["matched"] == 2
    assert [r["match"] for r in report["results"]] == [True, False, True, False]
    assert "adherence: 2 of 4 videos (50%)" in out


@pytest.mark.parametrize("args, message", [
    (["{video}"], "its prompt is needed"),
    (["{tmp}/missing.mp4", "--prompt", "a red square moving up"], "does not exist"),
    (["{tmp}", "--prompt", "a red square moving up"], "neither manifest.json"),
])
def test_cli_bad_input(tmp_path, capsys, args, message):
    from helios_deploy.runtime.video_io import write_mp4

    video = tmp_path / "v.mp4"
    write_mp4(video, [_uint8(procedural.video(0, HEIGHT, WIDTH)[0])])
    (tmp_path / "empty").mkdir()
    args = [a.format(video=video, tmp=tmp_path / "empty") for a in args]
    code, out, err = run_cli(["adherence", *args], capsys)
    assert code == 1 and message in err, err
