"""Train the tiny Helios-Distilled on procedural videos, on CPU, seeded: the checkpoint behind
``helios-deploy tiny-checkpoint DIR --trained`` (helios_deploy.checkpoints.trained).

    python -m helios_deploy.checkpoints.train_tiny [-o helios_deploy/checkpoints/trained_tiny]
    helios-deploy tiny-checkpoint DIR --trained --retrain

1. Tokenizer and text encoder: the tiny checkpoint's (build_tokenizer; a UMT5EncoderModel at seeded random
   weights, frozen: its outputs differ per caption word, which is all the transformer needs).
2. VAE: the tiny AutoencoderKLWan: the decoder a block-colour start (train_vae.init_decoder), the encoder trained (train_vae).
3. Transformer: the tiny HeliosTransformer3DModel trained through the runtime's distilled sampler loop
   (train_transformer), pyramid steps 1,1,1.

Both trainings run a fixed number of steps from fixed seeds on one thread-count-independent schedule, so a
rerun gives the same checkpoint up to the floating-point differences of the host's kernels. Like the demo,
this is a tool above the runtime: it imports the runtime's sampler; nothing below it imports this module.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..fsutil import staged_dir
from . import procedural
from .tiny import SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG, _randomize, build_tokenizer

HEIGHT, WIDTH = 64, 128  # the demo's and the tests' video size
SEED = 0
VAE_STEPS = 600
TRANSFORMER_STEPS = 800
POOL = 800
PACKAGE_DIR = Path(__file__).with_name("trained_tiny")
# The random tiny transformer (width 32) is too narrow for a distilled model to learn: each stage's single step
# is x0 = x_t - sigma * v with sigma near 1, so the flow v carries the noise's 64 values per patch back out,
# which a 32-wide token cannot hold. Width 128 (4 heads of 32) can; the rest is the tiny config.
TRANSFORMER = dict(TRANSFORMER_CONFIG, num_attention_heads=4, attention_head_dim=32, rope_dim=(16, 8, 8), ffn_dim=256)


def build_trained_pipeline(seed: int = SEED, vae_steps: int = VAE_STEPS, transformer_steps: int = TRANSFORMER_STEPS,
                           log=print, pool: int = POOL):
    """Train and return (HeliosPyramidPipeline (distilled, float32), training record); ``pool``: procedural
    videos the transformer's batches are drawn from. The VAE and the transformer are trained independently
    (the transformer learns on the VAE's anchor latents, known without the VAE), each from its own seed."""
    import torch
    from diffusers import HeliosDMDScheduler, HeliosPyramidPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    _randomize(text_encoder, torch.Generator().manual_seed(seed))
    text_encoder.eval()
    record = {"seed": seed, "height": HEIGHT, "width": WIDTH, "captions": len(procedural.all_captions()),
              "videos": pool}
    vae, record["vae"] = train_vae_part(seed, vae_steps, log)
    transformer, record["transformer"] = train_transformer_part(tokenizer, text_encoder, seed, transformer_steps,
                                                                pool, log)
    pipe = HeliosPyramidPipeline(scheduler=HeliosDMDScheduler(**SCHEDULER_CONFIG), tokenizer=tokenizer,
                                 text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 is_cfg_zero_star=False, is_distilled=True)
    return pipe, record


def train_vae_part(seed: int, steps: int, log=print):
    """(the trained AutoencoderKLWan, its record): the decoder is the block-colour one of init_decoder, the
    encoder trained to give the anchors. Training the decoder too (train_decoder=True) sharpens the shapes of
    the procedural videos, but it also turns the transformer's fainter output to black (tried: every video of
    the 300-step transformer came out black), so the shipped decoder keeps its start."""
    import torch
    from diffusers import AutoencoderKLWan

    from .train_vae import init_decoder, latent_stats, train_vae

    t = time.perf_counter()
    mean, std = latent_stats(HEIGHT, WIDTH, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=mean, latents_std=std)
    init_decoder(vae)
    log(f"training the VAE ({steps} steps)")
    record = train_vae(vae, HEIGHT, WIDTH, seed, steps, log=log, train_decoder=False)
    record["decoder_mse"] = None  # the decoder is not trained (JSON has no NaN)
    record["seconds"] = round(time.perf_counter() - t, 1)
    return vae, record


def train_transformer_part(tokenizer, text_encoder, seed: int, steps: int, pool: int, log=print):
    """(the trained HeliosTransformer3DModel, its record)."""
    import torch
    from diffusers import HeliosTransformer3DModel

    from .train_transformer import caption_embeddings, train_transformer
    from .train_vae import latent_stats

    t = time.perf_counter()
    mean, std = latent_stats(HEIGHT, WIDTH, seed)
    torch.manual_seed(seed)
    transformer = HeliosTransformer3DModel(**TRANSFORMER, is_amplify_history=True)
    embeds = caption_embeddings(tokenizer, text_encoder, procedural.all_captions())
    log(f"training the transformer ({steps} steps)")
    record = train_transformer(transformer, embeds, SCHEDULER_CONFIG, mean, std, HEIGHT, WIDTH, seed, steps, log=log,
                               videos=pool)
    record["seconds"] = round(time.perf_counter() - t, 1)
    return transformer, record


def save_trained(pipe, record: dict, out: Path, force: bool = True) -> Path:
    """The pipeline in diffusers layout (float32 safetensors, unsharded) and the training record."""
    with staged_dir(out, force=force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=PACKAGE_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--transformer-steps", type=int, default=TRANSFORMER_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared, busy machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pipe, record = build_trained_pipeline(args.seed, args.vae_steps, args.transformer_steps)
    record["seconds"] = round(time.perf_counter() - t, 1)
    record["threads"] = args.threads
    save_trained(pipe, record, args.output)
    print(f"trained tiny checkpoint written to {args.output} in {record['seconds']:.0f}s")


if __name__ == "__main__":
    main()
