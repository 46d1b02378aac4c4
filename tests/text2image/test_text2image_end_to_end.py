"""The whole flow on a text-to-image run, through the CLI: finetune (image folder + captions.txt),
generate, featurize, score, report, lds build/eval, counterfactual."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffattr.attribution.scores import Scores
from diffattr.cli import main
from diffattr.data import save_png
from diffattr.run import TEXT2IMAGE, RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_shapes):
    root = tmp_path_factory.mktemp("e2e")
    data = make_shapes(16)
    folder = root / "images"
    lines = []
    for i, (img, cap) in enumerate(zip(data.images, data.captions, strict=True)):
        save_png(img, folder / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\t{cap}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    run = root / "run"
    # one torch thread, as in the tests' retrainings (bit-exact counterfactual control)
    rc = main(["finetune", "--base", "tiny", "--data", str(folder), "--resolution", "16",
               "--val-count", "4", "--steps", "30", "--batch-size", "4", "--lr", "3e-3",
               "--lora-rank", "2", "--out", str(run), "--quiet", "--threads", "1"])  # fmt: skip
    assert rc == 0
    gen = ["generate", str(run), "--num", "4", "--steps", "8", "--quiet", "--threads", "1"]
    assert main(gen) == 0
    return run


def test_attribution_flow(run_dir, capsys):
    run = RunDir(run_dir)
    assert run.family == TEXT2IMAGE and (run.model_dir / "lora.safetensors").is_file()
    z = np.load(run.samples_dir / "samples.npz")
    assert set(z["prompts"]) <= {f"a {c} square" for c in ("red", "green", "blue", "white")}
    assert z["latents"].shape == (4, 4, 8, 8) and z["images"].shape == (4, 3, 16, 16)
    feat = ["--timesteps", "4", "--quiet"]
    assert main(["featurize", str(run_dir), "--method", "das", "--targets", "samples", *feat]) == 0
    methods = "das,dtrak,trak,grad-cos,pixel-cos,random"
    assert main(["score", str(run_dir), "--method", methods, "--k", "3", *feat]) == 0
    assert main(["score", str(run_dir), "--method", "das", "--targets", "val", *feat]) == 0
    for m in methods.split(","):
        s = Scores.load(run.scores_dir / f"{m}-samples")
        assert s.values.shape == (4, 12) and np.isfinite(s.values).all()
    das = Scores.load(run.scores_dir / "das-samples")
    # features are LoRA gradients of the conditional output, stored per settings
    meta = json.loads(next(run.features_dir.glob("train-das-*/meta.json")).read_text())
    assert meta["settings"]["features"]["params"] == r"\.lora_[AB]\."
    assert not np.allclose(das.values, Scores.load(run.scores_dir / "dtrak-samples").values)
    assert Scores.load(run.scores_dir / "das-val").values.shape == (4, 12)
    assert main(["report", str(run_dir), "--method", "das,dtrak", "--quiet"]) == 0
    html = run.report_path.read_text()
    assert "<img" in html
    for prompt in set(z["prompts"]):  # each target's prompt, and the ranked images' captions
        assert f"<span>{prompt}</span>" in html
    assert "<th>file</th><th>caption</th>" in html
    top = json.loads((run.scores_dir / "das-samples" / "topk.json").read_text())
    assert [t["caption"] for t in top] == [str(p) for p in z["prompts"]]
    for p in (p for t in top for p in t["proponents"]):
        assert p["train_source"].endswith(".png") and p["train_caption"].endswith(" square")
    capsys.readouterr()
    assert main(["score", str(run_dir), "--method", "tracin", "--quiet"]) == 2
    assert "tracin is not available for text2image runs (it needs checkpoints)" in (
        capsys.readouterr().err
    )
    assert main(["generate", str(run_dir), "--sampler", "ddpm", "--quiet"]) == 2


def test_lds_and_counterfactual(run_dir, tmp_path):
    bench, cf = tmp_path / "bench", tmp_path / "cf"
    assert main(["lds", "build", str(run_dir), "--out", str(bench), "--subsets", "4",
                 "--seeds", "0", "--num-val", "2", "--num-gen", "2", "--measure-timesteps",
                 "5", "--executor", "inprocess", "--quiet"]) == 0  # fmt: skip
    gt = np.load(bench / "ground_truth.npz")["F_t"]
    assert gt.shape == (1, 4, 4, 5) and np.isfinite(gt).all()
    assert np.ptp(gt.mean(-1), axis=1).min() > 0  # subset models differ on every target
    targets = np.load(bench / "targets.npz")
    assert targets["images"].shape == (4, 4, 8, 8) and targets["conditioning"].shape[0] == 4
    assert main(["lds", "eval", str(bench), "--run", str(run_dir), "--method",
                 "das,trak,pixel-cos,random", "--timesteps", "4", "--bootstrap", "20",
                 "--quiet"]) == 0  # fmt: skip
    rows = {r["method"]: r for r in json.loads((bench / "results.json").read_text())}
    assert {"das", "trak", "pixel-cos", "random"} <= set(rows)
    assert all(np.isfinite(rows[m]["gen"]["lds"]) for m in ("das", "trak", "random"))
    assert main(["counterfactual", str(run_dir), "--out", str(cf), "--method", "das", "--k",
                 "2", "--num-targets", "2", "--executor", "inprocess", "--timesteps", "4",
                 "--bootstrap", "20", "--picture-targets", "2", "--quiet"]) == 0  # fmt: skip
    res = {r["method"]: r for r in json.loads((cf / "results.json").read_text())}
    assert set(res) == {"das", "random", "none"}
    assert res["none"]["pixel_l2"] == [0.0, 0.0]  # a k = 0 retraining regenerates bit-exactly
    assert all(len(r) == 2 for r in res["das"]["removed_ids"])
    assert min(res["das"]["pixel_l2"]) > 0  # removing training images changed the images


def test_ekfac_and_das_plus_ekfac_on_lora(run_dir):
    """EK-FAC through kronfluence on a text-to-image run: the conditional UNet called on
    (x_t, t, caption embedding), the curvature fitted on the LoRA layers only (the run's
    default --params)."""
    run = RunDir(run_dir)
    feat = ["--timesteps", "2", "--quiet"]
    assert main(["score", str(run_dir), "--method", "ekfac,combine[methods=das+ekfac]", *feat]) == 0
    ekfac = Scores.load(run.scores_dir / "ekfac-samples")
    assert ekfac.values.shape == (4, 12) and np.isfinite(ekfac.values).all()
    assert np.ptp(ekfac.values, axis=1).min() > 0  # the training images are told apart
    both = Scores.load(run.scores_dir / "combine[methods=das+ekfac]-samples")
    assert both.values.shape == (4, 12) and np.isfinite(both.values).all()
    from diffattr.attribution.methods.influence import module_layout
    from diffattr.families import open_run

    bound = open_run(run)
    tracked = module_layout(bound.model, bound.attributor("ekfac").settings.params)
    assert tracked and all(".lora_" in name for name, _, _, _ in tracked)
    assert len(tracked) < len(module_layout(bound.model))  # not the frozen base layers
