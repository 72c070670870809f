import json
import os
from pathlib import Path

import click


@click.command("adherence")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="The prompt of the video(s); with ARTIFACTS, a prompt to generate (repeat; default: 20 prompts "
                   "that cover the vocabulary).")
@click.option("--seeds", default="0,1", show_default=True, metavar="LIST", help="ARTIFACTS: seeds per prompt.")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=33, show_default=True,
              help="ARTIFACTS: frames per video.")
@click.option("--precision", type=click.Choice(["fp32", "fp8"]), default="fp32", show_default=True,
              help="ARTIFACTS: the transformer graph to run (fp8: after `quantize --precision fp8`).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every result here.")
def command(paths, prompts, seeds, num_frames, precision, json_path):
    """What a video shows against its prompt: the colour of its brightest blob and the direction its centroid
    moves, per video, and the share of videos that match (plain image processing, no model).

    Each PATH is an mp4, a folder of frames (PNG, in name order), or an ARTIFACTS folder (exported from
    the trained tiny checkpoint: `tiny-checkpoint DIR --trained`), whose prompts x seeds are generated
    through the runtime first. Prompts use the vocabulary "a {red|green|blue|yellow|white} {square|circle}
    moving {left|right|up|down}".

    \b
    Examples:
      helios-deploy adherence engines/demo/demo.mp4 --prompt "a red square moving right"
      helios-deploy adherence engines/trained-onnx --seeds 0,1 --json adherence.json
      helios-deploy adherence engines/trained-onnx --precision fp8
    """
    from ..errors import UserError
    from ..measure.adherence import adherence_of, adherence_share, share_of, summary_line

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}", expected="comma-separated integers, e.g. 0,1") from None
    results = []
    for path in map(Path, paths):
        if (path / "manifest.json").is_file():
            from ..runtime import Pipeline

            report = adherence_share(Pipeline.from_artifacts(path, precision=precision), prompts or None,
                                     seed_list, num_frames)
            results += [{**r, "source": str(path)} for r in report["results"]]
            continue
        if not prompts:
            raise UserError(f"{path} is a video: its prompt is needed", fix='pass --prompt "a red square moving right"')
        frames = _read_frames(path)
        results += [{**adherence_of(frames, p), "source": str(path)} for p in prompts]
    for r in results:
        seen = r["seen"]
        click.echo(f"{'ok  ' if r['match'] else 'MISS'} {r['prompt']!r}{_seed(r)}: sees {seen['colour']} "
                   f"{seen['shape']} moving {seen['direction']}")
    report = share_of(results)
    click.echo(summary_line(report))
    if json_path:
        tmp = Path(f"{json_path}.partial-{os.getpid()}")
        tmp.write_text(json.dumps({**report, "results": results}, indent=2) + "\n")
        os.replace(tmp, json_path)


def _seed(r: dict) -> str:
    return f" seed {r['seed']}" if "seed" in r else ""


def _read_frames(path: Path):
    import numpy as np
    from PIL import Image

    from ..errors import UserError
    from ..runtime.video_io import read_video

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise UserError(f"{path} has neither manifest.json (artifacts) nor PNG frames",
                            expected="an mp4, a folder of PNG frames or an artifacts folder")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    if not path.is_file():
        raise UserError(f"{path} does not exist", expected="an mp4, a folder of PNG frames or an artifacts folder")
    return read_video(path)
