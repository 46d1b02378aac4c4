"""Where a run's weights come from: one axis of a model family, its modality the other.

A family is a modality (pixel images: :class:`~diffattr.families.pixel.PixelFamily`; latents
with captions: :class:`~diffattr.families.text2image.TextToImageFamily`) holding a weights
source — composition, not inheritance. A source says where the model and its noise process
are, what it allows methods to use, and what retraining it for an evaluation needs:

- trained by diffattr (the modality's ``Trained…`` source): ``RUN/model``, the noise process
  and training settings recorded in ``run.json``'s ``train``; checkpoints and trajectories
  exist;
- a user's own folders (:class:`ImportedWeights`, ``diffattr import``): ``run.json``'s
  ``source`` records the folders, the scheduler's config and the weights' sha256 (checked on
  every load); retraining needs the settings given with ``--train-config``; no training
  checkpoints, and the pipeline samples with its own scheduler (no recorded trajectories).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from diffattr.attribution.methods import (
    CHECKPOINTS,
    MODEL_CALLS,
    MODEL_INPUTS,
    TRAINING_LOSS,
    TRAJECTORIES,
)
from diffattr.errors import ConfigError
from diffattr.run import RunDir


class Weights:
    """A weights source trained by diffattr (the defaults; module docstring)."""

    #: What methods may use beyond the final model (intersected with the modality's).
    provides: ClassVar[frozenset[str]] = frozenset(
        {CHECKPOINTS, TRAJECTORIES, MODEL_CALLS, MODEL_INPUTS, TRAINING_LOSS}
    )

    def train_settings(self, run: RunDir, retrained: str, command: str) -> dict[str, Any]:
        """The training settings recorded in ``run.json`` (``retrained``/``command``: what a
        retraining fine-tunes and which command's options they are, for an error)."""
        return run.manifest()["train"]

    def scheduler_config(self, run: RunDir) -> dict[str, Any] | None:
        """The model's scheduler config, or None: the training settings' noise schedule."""
        return None

    def model_dir(self, run: RunDir) -> Path:
        """Where the run's model is (what the family's ``load_trained`` reads)."""
        return run.model_dir

    def verify(self, run: RunDir) -> None:
        """A :class:`~diffattr.errors.CheckpointError` when the weights changed (nothing to
        check for weights the run holds itself)."""

    def allow_pickle(self, run: RunDir) -> bool:
        """Whether pickle-based weight files may be loaded (the user's choice at import)."""
        return False


class ImportedWeights(Weights):
    """A user's own model folders, recorded at import (module docstring)."""

    # no training checkpoints; sampling is the pipeline's own; its loss is its schedule's, and
    # methods may call the model on (x_t, t[, conditioning]) themselves (EK-FAC)
    provides = frozenset({MODEL_CALLS, MODEL_INPUTS, TRAINING_LOSS})

    def source(self, run: RunDir) -> dict[str, Any]:
        """``run.json``'s ``source``: the folders, scheduler config and fingerprints."""
        return run.manifest()["source"]

    def train_settings(self, run: RunDir, retrained: str, command: str) -> dict[str, Any]:
        """The settings given with ``--train-config``, or an error saying that LDS and
        counterfactual evaluations need them to retrain ``retrained``."""
        manifest = run.manifest()
        if "train" not in manifest:
            raise ConfigError(
                f"{run.path} was imported without training settings: LDS and counterfactual "
                f"evaluations retrain {retrained} and need them",
                hint=f"import again with `diffattr import ... --train-config FILE --out "
                f"{run.path}` (the options of `{command}`, as JSON or TOML)",
            )
        return manifest["train"]

    def scheduler_config(self, run: RunDir) -> dict[str, Any]:
        return self.source(run)["scheduler_config"]

    def allow_pickle(self, run: RunDir) -> bool:
        return bool(self.source(run).get("allow_pickle", False))
