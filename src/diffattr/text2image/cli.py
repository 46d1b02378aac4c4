"""Command-line parsers of the text-to-image family (quick to build: nothing heavy imported).

``diffattr finetune`` makes a text-to-image run; ``diffattr generate`` takes prompts for one.
The other commands (featurize, score, report, lds, counterfactual) take either kind of run and
dispatch on its family (:mod:`diffattr.text2image.family`).
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0"


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.text2image.family import cmd_finetune

    return cmd_finetune(args)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """The options of ``diffattr generate`` that only text-to-image runs take."""
    g = p.add_argument_group("text-to-image runs")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt (repeat for several; cycled over --num; default: the training captions)",
    )
    g.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one a line")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance w (default 1: the conditional model alone)",
    )


def add_finetune_parser(add) -> argparse.ArgumentParser:
    """Register ``diffattr finetune`` with the CLI's ``add(name, help, examples, fn)``."""
    from diffattr.cli import _add_data_args

    p = add(
        "finetune",
        "fine-tune LoRA adapters of a text-to-image pipeline on captioned images "
        "(a text-to-image run; resumes an interrupted one)",
        """
        diffattr finetune --base ~/models/stable-diffusion-v1-5 --data ./paintings \\
            --resolution 512 --lora-rank 4 --steps 2000 --out runs/art
        diffattr finetune --base tiny --data captioned.npz --resolution 16 --steps 200 \\
            --lr 1e-3 --out runs/tiny-t2i
        """,
        _finetune,
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--base",
        required=True,
        help="local pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or "
        "'tiny' for a small random one built from config",
    )
    _add_data_args(p)
    g = p.add_argument_group("LoRA fine-tuning")
    g.add_argument("--resolution", type=int, default=512, help="image side in pixels (512)")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank r (default: 4)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale α (default: r)")
    g.add_argument(
        "--lora-targets",
        default=DEFAULT_TARGETS,
        help="comma-separated UNet module names that get adapters (default: attention projections)",
    )
    g.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--checkpoint-every", type=int, default=100)
    return p
