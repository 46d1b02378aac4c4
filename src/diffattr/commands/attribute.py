"""Attribution commands: ``featurize``, ``score``, ``report``.

Each command parses its options, asks the run's family (:mod:`diffattr.families`) for an
attributor per method and scores; nothing here depends on which method or family it is.
:func:`score_run` and :func:`write_run_report` are what the demo calls too.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.commands.options import (
    TARGETS_HELP,
    add_feature_args,
    add_index_args,
    add_lambda_args,
    add_screen_args,
    attributor_kwargs,
    driver_plan,
    feature_settings,
    one_method,
    parse_rows,
    screen_from_args,
)
from diffattr.errors import ConfigError, DiffattrError


def score_run(
    run: Any,
    methods: list[tuple[str, dict[str, Any]]],
    targets: str = "samples",
    k: int = 10,
    settings: Any = None,
    screen: Any = None,
    executor: Any = None,
    worker_device: str | None = None,
    groups: str | None = None,
    **attributor_options: Any,
) -> dict[str, str]:
    """Score ``targets`` of ``run`` with each (method, options); save ``RUN/scores/LABEL-NAME``
    (scores, top-k tables naming each image's file and caption, per-target confidence with
    its percentile among the run's held-out images and, for generated or given images, the
    near-copy check against them). ``executor``: featurize and tile the kernel products on
    it; ``groups``: a groups file, ``none``, or None for the training set's own labels (group
    scores in ``groups.json`` and ``--json``); ``attributor_options``: λ, batch size, device,
    progress, on_nonfinite. Returns label → scores directory, and ``targets``: per target its
    id, source, caption, near-copy flag and each method's confidence, held-out percentile and
    bin (and group scores)."""
    from diffattr.attribution.methods.spec import method_label
    from diffattr.families import open_run

    bound = open_run(run)
    out: dict[str, Any] = {}
    named = NamedAnswers(run, bound, targets, groups=groups)
    for method, given in methods:
        scores = bound.score(
            method, given, targets, settings, screen, executor, worker_device,
            **attributor_options,
        )  # fmt: skip
        label = method_label(method, given)
        named.add(label, scores)
        out[label] = str(scores.save(run.scores_dir / f"{label}-{named.name}", k=k))
    out["targets"] = named.per_target
    return out


class NamedAnswers:
    """What every answer about ``targets`` of ``run`` carries besides the scores: the training
    images' and targets' names, the targets' near-copy check (computed once, with the first
    method) and, per target, each method's confidence (``--json``'s ``targets``)."""

    def __init__(
        self,
        run: Any,
        bound: Any,
        targets: str,
        pictures: Any = None,
        cache: bool = True,
        groups: str | None = None,
    ) -> None:
        from diffattr.attribution.scores.names import Names

        self.run, self.bound, self.targets, self.cache = run, bound, targets, cache
        #: (train, val) as pictures: files, captions, groups
        self.pictures = pictures or run.data_spec().load()
        self.train_names = Names.of(self.pictures[0])
        self.groups = group_assignment(groups, self.train_names)
        self.per_target: list[dict[str, Any]] = []
        self.near: Any = None
        self.names: Any = None
        self.name = ""

    def add(self, label: str, scores: Any) -> None:
        """Name ``scores`` (of method ``label``), set their near-copy check and add their
        confidence to the per-target rows."""
        name, _, ids = self.bound.targets(self.targets, cache=self.cache)
        if not self.per_target:  # the first method: names and near-copy check, once
            self.name = name
            self.near = near_copies_of(self.run, self.bound.family, self.targets, self.pictures)
            self.names = target_names_of(self.run, self.targets, ids, self.pictures[1])
            self.per_target = target_rows(ids, self.names, self.near)
        if self.near is not None:
            scores.set_near_copies(self.near)
        scores.train_names, scores.target_names = self.train_names, self.names
        scores.groups = self.groups
        add_confidence(self.per_target, label, scores)
        grouped = scores.by_group() if self.groups else None
        if grouped is not None:
            for row, groups in zip(self.per_target, grouped.rows(), strict=True):
                row[label]["groups"] = groups


def group_assignment(spec: str | None, train_names: Any) -> dict[int, str] | None:
    """Training id → group: from a groups file, none (``none``), or by default the training
    images' own labels (digit classes, emoji categories) when they have some."""
    from diffattr.attribution.scores.groups import read_groups

    if spec is not None and spec.lower() == "none":
        return None
    if spec is not None:
        return read_groups(spec, train_names)
    if not train_names.groups:
        return None
    return dict(zip(train_names.ids.tolist(), train_names.groups, strict=True))


def query_run(
    run: Any,
    method: str,
    given: dict[str, Any],
    targets: str,
    k: int = 10,
    settings: Any = None,
    screen: Any = None,
    build: bool = False,
    **attributor_options: Any,
) -> dict[str, Any]:
    """``diffattr query``: targets scored by the run's index of ``method`` (built first when
    ``build``); what ``score`` would save, returned instead (nothing in the run changes):
    ``method``, ``targets`` (per target its id, source, caption, near-copy flag and
    confidence) and ``answers`` (``topk.json``'s rows)."""
    from diffattr.attribution.methods.spec import method_label
    from diffattr.families import open_run

    bound = open_run(run)
    index = bound.index(method, given, settings, screen, build, **attributor_options)
    scores = index.score(targets)
    label = method_label(method, given)
    named = NamedAnswers(run, bound, targets)
    named.add(label, scores)
    return {"method": label, "targets": named.per_target, "answers": scores.topk_rows(k)}


def target_names_of(run: Any, spec: str, ids: np.ndarray, val_set: Any) -> Any:
    """:class:`~diffattr.attribution.scores.names.Names` of target ``spec``: held-out (``val_set``)
    or given images' files and captions; generated ones' rows of their samples file and
    prompts."""
    from diffattr.attribution.scores.names import Names, generated_names
    from diffattr.families import given_images, is_samples_file, samples_path

    if spec == "val":
        return Names.of(val_set)
    path = Path(spec)
    if spec != "samples" and not is_samples_file(path):
        return Names.of(given_images(run, path))
    path = samples_path(run, spec)
    with np.load(path, allow_pickle=False) as z:
        prompts = [str(p) for p in z["prompts"].tolist()] if "prompts" in z.files else None
    return generated_names(ids, path.name, prompts)


def target_rows(ids: np.ndarray, names: Any, near: Any) -> list[dict[str, Any]]:
    """``--json``'s per-target rows: id, source, caption and near-copy flag."""
    rows = []
    for t, i in enumerate(np.asarray(ids).tolist()):
        row = {"id": int(i), **{f: names.row(i)[f] for f in ("source", "caption")}}
        if near is not None:
            row["near_copy"] = bool(near.flagged[t])
        rows.append(row)
    return rows


def add_confidence(rows: list[dict[str, Any]], label: str, scores: Any) -> None:
    """Add ``label``: {confidence, percentile (among held-out images), bin} to each row."""
    pct = scores.confidence_percentiles()
    pct = np.full(len(rows), np.nan) if pct is None else pct
    for row, value, p, bin_ in zip(
        rows, scores.confidence(), pct, scores.confidence_bins(), strict=True
    ):
        row[label] = {
            "confidence": float(value) if np.isfinite(value) else None,
            "percentile": float(p) if np.isfinite(p) else None,
            "bin": bin_,
        }


def near_copies_of(run: Any, family: Any, targets: str, pictures: tuple[Any, Any]) -> Any:
    """The near-copy check of ``targets`` (as pictures) against the run's training images
    (``pictures``: the run's training and held-out sets), at the quantile of its held-out
    images' distances; None for the held-out images themselves. Nearest images are named by
    training id."""
    from diffattr.attribution.scores.confidence import near_copies

    if targets == "val":
        return None
    train_set, val_set = pictures
    _, images, _ = family.images(run, targets)
    return near_copies(images, train_set, val_set)


def scored_methods(run: Any, targets: str) -> list[str]:
    """The methods with scores of ``targets`` in ``run`` (``RUN/scores/METHOD-TARGETS``), sorted."""
    suffix = f"-{targets}"
    if not run.scores_dir.is_dir():
        return []
    return sorted(
        d.name[: -len(suffix)]
        for d in run.scores_dir.iterdir()
        if d.name.endswith(suffix) and (d / "scores.npy").is_file()
    )


def load_run_scores(run: Any, name: str, methods: list[str], ids: np.ndarray, train_ids) -> dict:
    """The saved scores of ``methods`` for targets ``name`` (those that exist), checked against
    the run's training set and the targets' ids."""
    from diffattr.attribution.scores import Scores

    scores = {}
    for method in methods:
        d = run.scores_dir / f"{method}-{name}"
        if not (d / "scores.npy").is_file():
            continue
        try:
            s = Scores.load(d)
        except DiffattrError as exc:
            raise DiffattrError(f"{d / 'scores.npy'}: {exc}", hint=exc.hint) from exc
        except (OSError, ValueError, EOFError) as exc:
            raise DiffattrError(f"cannot read scores in {d}: {exc}") from exc
        if not np.array_equal(np.sort(s.train_ids), np.sort(train_ids)):
            raise DiffattrError(
                f"{d / 'scores.npy'} scores {s.train_ids.size} training samples, but the "
                f"run's training set has {train_ids.size} (other ids)",
                hint=f"rerun `diffattr score {run.path} --method {method}`",
            )
        if not np.isin(np.asarray(ids), s.target_ids).all():
            raise DiffattrError(
                f"{d / 'scores.npy'} holds {s.target_ids.size} targets, not the "
                f"{len(ids)} {name} targets of the report",
                hint=f"rerun `diffattr score {run.path} --method {method}`",
            )
        scores[method] = s
    return scores


def counterfactual_figures(results: str | None) -> list[tuple[str, Path]]:
    """The counterfactual picture next to its results.json, when there is one."""
    if not results or not (Path(results).parent / "counterfactual.png").is_file():
        return []
    caption = "Counterfactual: reference, then regenerated after random / method removals"
    return [(caption, Path(results).parent / "counterfactual.png")]


def write_run_report(
    run: Any,
    targets: str = "samples",
    methods: list[str] | None = None,
    out: str | Path | None = None,
    lds: str | None = None,
    counterfactual: str | None = None,
    groups: str | None = None,
) -> tuple[Path, list[str]]:
    """Write ``RUN/report.html`` (or ``out``): the targets, the saved scores of ``methods``
    (default: every method with scores of them), the run's quality summary, LDS and
    counterfactual results when given; ``groups`` as for :func:`score_run`. Returns the file and
    the methods shown."""
    from diffattr.attribution.scores.names import Names
    from diffattr.families import family_of
    from diffattr.fsio import read_json
    from diffattr.report import load_rows, write_report

    name, images, ids = family_of(run).images(run, targets)
    train_set, val_set = run.data_spec().load()
    methods = methods if methods else scored_methods(run, name)
    scores = load_run_scores(run, name, methods, ids, train_set.ids.numpy())
    summary: dict[str, Any] = {"run": str(run.path), "training images": len(train_set)}
    if (run.path / "quality.json").is_file():
        summary.update(read_json(run.path / "quality.json"))
    cf_rows = None
    if counterfactual:
        rows = load_rows(counterfactual, "counterfactual results")
        cf_rows = [r for r in rows if not r.get("control")]
    path = write_report(
        Path(out) if out else run.report_path,
        targets=images,
        target_ids=ids,
        train=train_set,
        scores=scores,
        title=f"diffattr report: {run.path.name} ({name})",
        summary=summary,
        lds_rows=load_rows(lds) if lds else None,
        counterfactual_rows=cf_rows,
        figures=counterfactual_figures(counterfactual),
        heldout=None if name == "val" else val_set.images,
        target_kind="val" if name == "val" else "gen",
        target_names=target_names_of(run, targets, ids, val_set),
        groups=group_assignment(groups, Names.of(train_set)) or {},
    )
    return path, sorted(scores)


# ---------------------------------------------------------------------------- handlers


def cmd_featurize(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.methods.spec import parse_method_list
    from diffattr.families import open_run
    from diffattr.parallel import workers_from_args
    from diffattr.run import RunDir

    run = RunDir(args.run)
    bound = open_run(run)
    bounds = parse_rows(args.rows) if getattr(args, "rows", None) else None
    out: dict[str, Any] = {}
    plan = driver_plan(args)
    settings, options = feature_settings(plan), attributor_kwargs(plan)
    with workers_from_args(args) as executor:
        for method, given in parse_method_list(args.method):
            bound.method(method, given, settings)  # an unknown method or option fails first
            rows = None
            if bounds is not None:
                n = len(bound.train_set)
                a, b = bounds[0] or 0, n if bounds[1] is None else bounds[1]
                if a >= n or b > n:
                    raise ConfigError(
                        f"--rows {args.rows} is outside the {n} training rows (0:{n})"
                    )
                rows = np.arange(a, b)
            store = bound.featurize(method, given, settings, rows, executor, args.device, **options)
            if store is None:
                continue  # a method without stored features
            if executor is not None and rows is None and not store.is_complete():
                raise DiffattrError(
                    f"feature store {store.path} is incomplete after the workers finished",
                    hint="rerun the same command to compute the missing rows",
                )
            out[f"train_store[{method}]"] = str(store.path)
            if rows is not None:
                done = f"{store.num_done}/{store.num_rows} done"
                out[f"rows[{method}]"] = f"{rows[0]}:{rows[-1] + 1} ({done})"
            if args.targets:
                tstore = bound.featurize_targets(method, given, settings, args.targets, **options)
                out[f"target_store[{method}]"] = str(tstore.path)
    return out


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.methods.spec import parse_method_list
    from diffattr.parallel import workers_from_args
    from diffattr.run import RunDir

    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    run = RunDir(args.run)
    screen = screen_from_args(args)
    plan = driver_plan(args)
    with workers_from_args(args) as executor:
        return score_run(
            run, parse_method_list(args.method), args.targets, args.k, feature_settings(plan),
            screen, executor, args.device, args.groups, **attributor_kwargs(plan),
        )  # fmt: skip


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.families import open_run
    from diffattr.run import RunDir

    method, given = one_method(args)
    bound = open_run(RunDir(args.run))
    index = bound.index(
        method, given, feature_settings(args), screen_from_args(args), **attributor_kwargs(args)
    )
    return {"index": str(index.path), "method": index.attributor.method.name}


def cmd_query(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.run import RunDir

    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    method, given = one_method(args)
    run = RunDir(args.run)
    results = [
        query_run(run, method, given, image, args.k, feature_settings(args), screen_from_args(args),
                  args.build, **attributor_kwargs(args))
        for image in args.images
    ]  # fmt: skip
    if args.json:
        return {"queries": results}
    for result in results:
        for row, answer in zip(result["targets"], result["answers"], strict=True):
            print_answer(result["method"], row, answer)
    return {}


def print_answer(label: str, row: dict[str, Any], answer: dict[str, Any]) -> None:
    """One target's answer, as a person reads it: its name, the near-copy verdict, κ and the
    top proponents with their names."""
    conf = row[label]
    near = {True: "a near copy of a training image", False: "no near copy"}.get(
        row.get("near_copy"), "near copies not checked"
    )
    pct = "" if conf["percentile"] is None else f", above {conf['percentile']:.0f}% of held-out"
    print(f"{row['source'] or row['id']}: {near}; κ {conf['confidence']:.3g}{pct} "
          f"({conf['bin'] or 'not calibrated for this data'})")  # fmt: skip
    for r, p in enumerate(answer["proponents"], 1):
        name = p["train_source"] or ""
        caption = f" “{p['train_caption']}”" if p["train_caption"] else ""
        print(f"  {r:>2}. #{p['train_id']:<6} {p['score']:+.4g}  {name}{caption}")


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.run import RunDir

    run = RunDir(args.run)
    methods = args.method.split(",") if args.method else None
    path, shown = write_run_report(
        run, args.targets, methods, args.out, getattr(args, "lds", None),
        getattr(args, "counterfactual", None), getattr(args, "groups", None),
    )  # fmt: skip
    return {"report": str(path), "methods": shown}


def method_listing(name: str) -> dict[str, Any]:
    """What ``diffattr methods NAME`` says of a method: its description (the class docstring),
    what it scores and needs, and its options (kind, default)."""
    import inspect

    from diffattr.attribution.methods import METHODS
    from diffattr.attribution.methods.options import options_table

    cls = METHODS[name]
    context = {"noise_seed": "--noise-seed", "run_dir": "the run"}
    rows = [
        (n, k, f"{context[cls.context_defaults[n]]} ({d})" if n in cls.context_defaults else d, h)
        for n, k, d, h in options_table(cls.option_specs())
    ]
    return {
        "method": name,
        "description": inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " "),
        "features": cls.measure or ("its own" if cls.needs_model else "images"),
        "kernel": cls.uses_kernel,
        "needs": sorted(cls.needs),
        "options": [{"name": n, "kind": k, "default": d, "help": h} for n, k, d, h in rows],
    }  # fmt: skip


def cmd_methods(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.attribution.methods import METHODS

    names = args.names or sorted(METHODS)
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}", hint=f"choose from {sorted(METHODS)}")
    listing = [method_listing(n) for n in names]
    if args.json:
        return {"methods": listing}
    for entry in listing:
        needs = f"; needs {', '.join(entry['needs'])}" if entry["needs"] else ""
        kernel = ", kernel" if entry["kernel"] else ""
        print(f"{entry['method']}  (features: {entry['features']}{kernel}{needs})")
        if args.names and entry["description"]:
            print(f"  {entry['description']}")
        for o in entry["options"]:
            print(f"    {o['name']:<22} {o['kind']:<32} default {o['default']}")
            if args.names and o["help"]:
                for line in textwrap.wrap(o["help"], 76):
                    print(f"        {line}")
    return {}


def register(add) -> None:
    from diffattr.parallel import add_executor_args

    p = add(
        "featurize",
        "compute and store training (and target) features for attribution",
        """
        diffattr featurize runs/digits --method das,dtrak
        diffattr featurize runs/digits --method trak --targets samples \\
            --projector countsketch --proj-dim 4096
        diffattr featurize runs/digits --executor local --workers 2      # 2 worker processes
        diffattr featurize runs/digits --executor ray --ray-address auto  # an existing cluster
        diffattr featurize runs/cifar --device cuda --grad-dtype bf16 \\
            --projector trak-cuda --proj-dim 4096
        """,
        cmd_featurize,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--method", default="das", help="comma-separated methods (default: das)")
    p.add_argument("--targets", default=None, help="also featurize targets: " + TARGETS_HELP)
    p.add_argument(
        "--rows",
        default=None,
        metavar="START:END",
        help="only these training rows (one worker's share; workers on disjoint rows of one "
        "store run side by side)",
    )
    p.add_argument(
        "--on-nonfinite",
        choices=["stop", "skip"],
        default="stop",
        help="a sample with NaN/Inf gradients: stop with an error naming it (default), or "
        "record it as skipped (scored 0) with a warning",
    )
    add_feature_args(p)
    add_executor_args(p, default="inprocess")

    p = add(
        "methods",
        "list the attribution methods, what each needs and its options (kind, default)",
        """
        diffattr methods
        diffattr methods das ekfac
        diffattr methods abu --json
        """,
        cmd_methods,
    )
    p.add_argument("names", nargs="*", help="methods to describe (default: all)")

    p = add(
        "score",
        "score targets against the training set; writes scores and top-k tables",
        """
        diffattr score runs/digits --method das,dtrak
        diffattr score runs/digits --method "das[leverage=true]" --targets val --k 20
        diffattr score runs/big --method das --executor ray --ray-address auto  # tiles on Ray
        """,
        cmd_score,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--method",
        default="das",
        help="comma-separated methods (default: das); options in brackets, e.g. "
        "das[leverage=true], tracin[checkpoints=RUN]; `diffattr methods` lists them",
    )
    p.add_argument("--targets", default="samples", help=TARGETS_HELP)
    p.add_argument("--k", type=int, default=10, help="top-k written to topk.csv/json")
    p.add_argument(
        "--groups",
        default=None,
        metavar="FILE|none",
        help="group scores per target (groups.json, --json) by the groups in FILE (CSV rows "
        "image,group or JSON {image: group}; images by id or file name), or by the training "
        "set's own labels when it has some (digit classes, emoji categories; the default), or "
        "none",
    )
    add_lambda_args(p)
    add_screen_args(p)
    add_feature_args(p)
    add_executor_args(p, default="inprocess")

    p = add(
        "index",
        "precompute what queries need (training features, the kernel's factor, κ's reference)",
        """
        diffattr index runs/digits                   # the default method, das
        diffattr index runs/digits --method dtrak --timesteps 100
        """,
        cmd_index,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--method", default="das", help="the method to index (default: das)")
    add_index_args(p)

    p = add(
        "query",
        "attribute images with the run's index: what score gives, in seconds, nothing written",
        """
        diffattr query runs/digits my_image.png
        diffattr query runs/digits folder/ --k 5 --json
        diffattr query runs/digits samples --build   # build the index first if missing
        """,
        cmd_query,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("images", nargs="+", help=TARGETS_HELP)
    p.add_argument("--method", default="das", help="the indexed method (default: das)")
    p.add_argument("--k", type=int, default=10, help="proponents and opponents per target")
    p.add_argument("--build", action="store_true", help="build the index when it is missing")
    add_index_args(p)

    p = add(
        "report",
        "write the HTML report of a run",
        """
        diffattr report runs/digits
        diffattr report runs/digits --method das,dtrak,trak --out /tmp/report.html
        """,
        cmd_report,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--method",
        default=None,
        help="comma-separated methods to show (default: every method with scores of the targets)",
    )
    p.add_argument(
        "--groups",
        default=None,
        metavar="FILE|none",
        help="show each target's groups (as for score): the groups in FILE, the training set's "
        "own labels when it has some (the default), or none",
    )
    p.add_argument("--targets", default="samples", help=TARGETS_HELP)
    p.add_argument("--out", default=None, help="output file (default: RUN/report.html)")
    p.add_argument(
        "--lds",
        default=None,
        metavar="RESULTS_JSON",
        help="LDS results to plot: BENCH/results.json from `diffattr lds eval`",
    )
    p.add_argument(
        "--counterfactual",
        default=None,
        metavar="RESULTS_JSON",
        help="counterfactual results to plot: OUT/results.json from `diffattr counterfactual`",
    )
