"""How sure the report is: each target's confidence κ and its calibrated bin, the committed
calibration, the near-copy check and the words on how to read them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffattr.attribution.scores import Scores
from diffattr.attribution.scores.confidence import (
    DEFINITION,
    HELDOUT_REFERENCE,
    LIKE_FACTOR,
    NOT_LIKE,
    NearCopies,
    bin_lds,
    calibration_words,
    describe_data,
    like_calibration,
    method_calibration,
    near_copies,
)
from diffattr.attribution.scores.names import Names
from diffattr.data import ImageDataset
from diffattr.report.elements import DASH, _e, _figure, _hover

KIND_WORDS = {"val": "held-out real", "gen": "generated"}


def percentile_text(percentile: float | None, count: int | None) -> str:
    """'more concentrated than p% of the run's held-out images' (or '' without a reference)."""
    if percentile is None:
        return ""
    n = f" ({count} scored the same way)" if count else ""
    return f"more concentrated than {percentile:.0f}% of the run's held-out real images{n}"


def confidence_text(
    method: str,
    kappa: float | None,
    bin_name: str | None,
    screened: bool,
    kind: str,
    percentile: float | None = None,
    status: str | None = None,
    heldout_count: int | None = None,
) -> str:
    """HTML: κ, its percentile among the run's held-out images, its bin and the bin's measured
    mean LDS [CI] per benchmark (or why there is no bin: ``status``)."""
    k = DASH if kappa is None else f"{kappa:.3g}"
    entry = method_calibration(method)
    rel = percentile_text(percentile, heldout_count)
    head = f"confidence κ = {k}" + (f": {rel}" if rel else "")
    if screened:
        return f"{head}; <em>not calibrated</em> (screened scores: κ over the candidates only)"
    if entry is None:
        return f"{head}; <em>not calibrated</em> for {_e(method)}"
    if not entry.get("validated"):
        return (
            f"{head}; <em>not validated</em> for {_e(method)}: its κ did not predict "
            "per-target LDS on every held-out benchmark"
        )
    if bin_name is None:
        return head + (f"; <em>{_e(status)}</em>" if status else "")
    rows = bin_lds(entry, bin_name, kind)
    measured = "; ".join(
        f"{r['mean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] on {_e(r['benchmark'])} "
        f"(n = {r['count']})"
        for r in rows
    )
    return (
        f"<span class='badge {bin_name}'>{bin_name} confidence</span> κ = {k}"
        + (f", {rel}" if rel else "")
        + f". Measured mean LDS of {KIND_WORDS.get(kind, kind)} targets in this bin: "
        f"{measured or DASH} ({_e(entry.get('settings', ''))})."
    )


def near_copy_html(
    near: dict[str, Any] | None, train_uri: Callable[[int], str], names: Names | None = None
) -> str:
    """The near-copy verdict of one target (``near``: one target's fields), or ''; the
    nearest training image named by id and, with ``names``, by file."""
    if near is None:
        return ""
    q = near["quantile"]
    rule = (
        f"{q:.0%} quantile of held-out real images' nearest-training-image distances"
        f" (pixel L2 {near['pixel_threshold']:.3g}"
        + (
            f"; embedding 1 − cos {near['embedding_threshold']:.3g}"
            if near.get("embedding_threshold") is not None
            else ""
        )
        + ")"
    )
    nearest = int(near["nearest_train_id"])
    label = _e(names.label(nearest) if names is not None else f"#{nearest}")
    dist = f"pixel L2 {near['pixel_distance']:.3g}"
    if near.get("embedding_distance") is not None:
        dist += f", 1 − cos {near['embedding_distance']:.3g}"
    if near["flagged"]:
        return (
            "<div class='near copy' data-near-copy='true'><span class='badge copy'>near copy"
            f"</span> nearest training image {label} ({dist}) is at most the {rule}."
            + _figure(train_uri(nearest), [f"#{nearest}", "nearest"], "opp",
                      f"nearest training image {nearest}", _hover(names, nearest))
            + "</div>"
        )  # fmt: skip
    return (
        f"<div class='near' data-near-copy='false'>not a near copy: nearest training image "
        f"{label} ({dist}) is farther than the {rule}.</div>"
    )


def near_copy_rows(
    targets: torch.Tensor,
    target_list: list[int],
    train: ImageDataset,
    scores: dict[str, Scores],
    heldout: Any,
    quantile: float,
    encoder: Callable[[Any], Any] | None,
) -> dict[int, dict[str, Any]] | None:
    """Per target id, its near-copy fields: computed from ``heldout`` when given, else the
    first scores that carry them (``Scores.set_near_copies``); None when neither."""
    if heldout is not None:
        nc: NearCopies = near_copies(targets, train, heldout, quantile, encoder)
        meta = nc.to_meta()
        rows = {}
        for t, tid in enumerate(target_list):
            rows[tid] = {
                k: (v[t] if isinstance(v, list) else v) for k, v in meta.items() if k != "rule"
            }
        return rows
    for s in scores.values():
        meta = s.meta.get("near_copy")
        if meta:
            out = {}
            for t, tid in enumerate(s.target_ids.tolist()):
                out[int(tid)] = {
                    k: (v[t] if isinstance(v, list) else v) for k, v in meta.items() if k != "rule"
                }
            return out
    return None


def calibration_table(methods: Sequence[str], kind: str) -> str:
    """The committed calibration of the methods shown: cut points and bin LDS per benchmark."""
    rows = []
    for m in methods:
        entry = method_calibration(m)
        if entry is None or not entry.get("validated"):
            continue
        cuts = entry["cuts"]
        for bin_name, rng in zip(
            ("low", "medium", "high"),
            (f"κ < {cuts[0]:.3g}", f"{cuts[0]:.3g} ≤ κ < {cuts[1]:.3g}", f"κ ≥ {cuts[1]:.3g}"),
            strict=True,
        ):
            cells = "".join(
                f"<td class='num'>{r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
                f" (n = {r['count']})</td>"
                for r in bin_lds(entry, bin_name, kind)
            )
            rows.append(
                f"<tr><td>{_e(m)}</td><td>{bin_name}</td><td class='num'>{_e(rng)}</td>{cells}</tr>"
            )
    if not rows:
        return ""
    entry = next(method_calibration(m) for m in methods if method_calibration(m))
    benches = list(entry.get("lds", {}))
    return (
        "<div class='scroll'><table id='calibration-table'><thead><tr><th>method</th><th>bin"
        "</th><th>κ</th>"
        + "".join(f"<th>{_e(b)}: mean LDS [95% CI]</th>" for b in benches)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _confidence_section(
    methods: list[str],
    kind: str,
    quantile: float,
    near: dict[int, Any] | None,
    train: ImageDataset | None = None,
) -> str:
    """'How sure': how to read the numbers, whether this run's data are like the benchmarks',
    the calibration table and the near-copy rule."""
    table = calibration_table(methods, kind)
    flagged = sum(bool(v.get("flagged")) for v in (near or {}).values())
    return (
        "<section id='confidence'><h2>How sure can we be?</h2>"
        + how_to_read(quantile)
        + ("" if train is None else like_note(train.shape, len(train)))
        + "<p class='note'>Per target and "
        f"method, the confidence κ is the {_e(DEFINITION)}: a few training images standing "
        "far out of the bulk. On the LDS benchmarks (<code>benchmarks/confidence.py</code>) "
        "targets with a higher κ had a higher LDS (their attribution predicted retraining "
        "better); bins cut at the terciles of κ on the digits8 benchmark. Below: the mean "
        f"per-target LDS of {KIND_WORDS.get(kind, kind)} benchmark targets in each bin. A bin "
        "is an average over targets, not a guarantee for one image.</p>"
        + (table or "<p class='note'>None of the methods shown is calibrated.</p>")
        + "<p class='note'>Near copy: a target whose nearest training image (pixel L2) is "
        f"at most the {quantile:.0%} quantile of held-out real images' nearest-training-image "
        f"distances, i.e. closer than {1 - quantile:.0%} of real images not trained on."
        + (
            f" Flagged here: {flagged} of {len(near)} targets."
            if near is not None
            else " Not checked in this report (no held-out images given)."
        )
        + "</p></section>"
    )


def like_note(shape: tuple[int, int, int], count: int) -> str:
    """Whether this run's training data are like a calibration benchmark's, in one line."""
    bench = like_calibration(shape, count)
    data = _e(describe_data(shape, count))
    if bench:
        return (
            f"<p class='note' id='like'>This run's training data ({data}) are like {bench}'s: "
            "bins are shown.</p>"
        )
    return (
        f"<p class='note' id='like'>This run's training data ({data}) are not like the "
        f"benchmarks': no bins (<em>{NOT_LIKE}</em>); read κ against the held-out images.</p>"
    )


def how_to_read(quantile: float) -> str:
    """The plain-words paragraph 'How to read this': κ, the held-out percentile, the bin (and
    the benchmarks it comes from) and the near-copy flag."""
    return (
        "<div class='note' id='how-to-read'><h3>How to read this</h3><p><b>κ</b> says how "
        "concentrated a target's scores are: near 0 when credit is spread evenly over the "
        "training images (a bell curve), large when a few training images stand far above the "
        "rest. A concentrated attribution was more often right when checked by retraining, "
        "but κ has no fixed scale: what counts as large depends on the data, the model and "
        "the method.</p><p><b>More concentrated than p% of held-out images</b> puts κ on "
        "this run's own scale: the same method scored up to "
        f"{HELDOUT_REFERENCE} of the run's held-out real images (never trained on) the same "
        "way, and p is the share of them whose κ is lower. It needs no ground truth; a "
        "target well above the held-out images leans on particular training images more than "
        "an unseen real image does.</p><p><b>The bin</b> (low / medium / high) and the mean "
        "LDS beside it were measured on small benchmarks: "
        f"{_e(calibration_words())}. They are shown only for data like those: the same image "
        f"size and channels and a training set within a factor {LIKE_FACTOR:g} of its size; "
        f"otherwise the bin reads <em>{NOT_LIKE}</em>, as the numbers measured there do not "
        "transfer. A bin is an average over many targets, never a guarantee for one "
        "image.</p><p><b>Near copy</b> flags a target whose nearest training image is closer "
        f"than all but {quantile:.0%} of the held-out real images are to theirs: the model "
        "may have reproduced that training image.</p></div>"
    )
