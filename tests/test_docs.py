"""The documentation: README.md and docs/*.md.

- ``mkdocs build --strict`` builds the pages (skipped, with the reason, without mkdocs);
- every fenced code block runs — Python as written, shell line by line, ``diffattr`` lines
  through the CLI — on tiny data; the convention (``<!-- docs-test: ... -->`` directives before
  a block) is documented in docs/development.md, "How code blocks are tested";
- the README stays short, nothing links outside the repository, and docs/architecture.md names
  every module of the package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

PYTHON = {"python", "py", "pycon"}
SHELL = {"bash", "sh", "shell"}
NOT_RUN = {"text", "toml", "json", "yaml", "csv", "html"}  # data and diagrams, never run
# Set-up, installs and downloads: not run by rule (docs/development.md).
SKIPPED_COMMANDS = ("make", "pip", "pip3", "npm", "huggingface-cli")
FIXTURES = ("run", "repo", "images", "captioned", "ddpm-pipeline", "sd-pipeline", "lora", "file")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:(.*?)(-->)?\s*$")


# ------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if ROOT in self.page.parents else self.page.name
        return f"{page}:{self.line}"

    def has(self, name: str) -> bool:
        return name in self.directives

    @property
    def skip_reason(self) -> str | None:
        for d in self.directives:
            m = re.fullmatch(r"skip\s*\((.+)\)", d)
            if m:
                return m.group(1).strip()
        return None

    @property
    def substitutions(self) -> list[tuple[str, str]]:
        return [tuple(part.strip() for part in d.split("=>", 1)) for d in self.directives
                if "=>" in d]  # fmt: skip

    @property
    def fixtures(self) -> list[tuple[str, str]]:
        out = []
        for d in self.directives:
            key, eq, value = d.partition("=")
            if eq and "=>" not in d and key.strip() in FIXTURES:
                out.append((key.strip(), value.strip()))
        return out


def split_directives(text: str) -> list[str]:
    return [d.strip() for d in re.split(r"[;\n]", text) if d.strip()]


def check_directive(d: str) -> str | None:
    """None if ``d`` is a known directive, else what is wrong with it."""
    if d in ("continue", "emoji") or "=>" in d:
        return None
    if d.startswith("skip"):
        return None if re.fullmatch(r"skip\s*\(.+\)", d) else "a skip needs a reason: skip (…)"
    key, eq, value = d.partition("=")
    if eq and key.strip() in FIXTURES and value.strip():
        if key.strip() == "file" and ":" not in value:
            return "file=PATH: TEXT"
        return None
    return f"unknown directive {d!r}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks with their directives, and the problems found on the way
    (unknown directives, directives not followed by a block)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[str] = []
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m:
            fence, lang = m.group(2), m.group(3).lower()
            body = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j][len(m.group(1)) :] if lines[j].startswith(m.group(1))
                            else lines[j])  # fmt: skip
                j += 1
            blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", pending))
            pending = []
            i = j + 1
            continue
        d = DIRECTIVE.match(line)
        if d:
            text = d.group(1)
            start = i
            while not d.group(2):  # a comment over several lines
                i += 1
                if i >= len(lines):
                    problems.append(f"{page.name}:{start + 1}: unterminated docs-test comment")
                    break
                d = re.match(r"^(.*?)(-->)?\s*$", lines[i])
                text += "\n" + d.group(1)
            pending += split_directives(text)
            pending_line = start + 1
            for directive in split_directives(text):
                problem = check_directive(directive)
                if problem:
                    problems.append(f"{page.name}:{start + 1}: {problem}")
        elif line.strip() and pending:
            problems.append(f"{page.name}:{pending_line}: docs-test directives not followed by "
                            "a code block")  # fmt: skip
            pending = []
        i += 1
    if pending:
        problems.append(f"{page.name}:{pending_line}: docs-test directives at the end of the page")
    return blocks, problems


def chains() -> list[list[Block]]:
    """Runnable blocks grouped so that a block marked ``continue`` runs after the one before it
    (same page), in its directory and namespace."""
    out: list[list[Block]] = []
    for page in PAGES:
        blocks, _ = parse(page)
        for block in blocks:
            if block.lang not in PYTHON | SHELL:
                continue
            if block.has("continue") and out and out[-1][0].page == page:
                out[-1].append(block)
            else:
                out.append([block])
    return out


CHAINS = chains()


# ------------------------------------------------------------------------- tiny fixtures
def _png(array: np.ndarray, path: Path) -> None:
    """Save an H×W or H×W×3 uint8 array as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_images(path: Path, n: int = 20) -> Path:
    """n built-in digits (8×8 grey) as PNG files."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:n]
    for i, image in enumerate(digits):
        _png((image * 255 / 16).astype(np.uint8), path / f"{i:02d}.png")
    return path


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def make_captioned(path: Path, n: int = 20) -> Path:
    """n 16×16 colour images (a coloured square somewhere) with captions.txt."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        image = np.zeros((16, 16, 3), np.uint8)
        y, x = rng.integers(0, 8, 2)
        image[y : y + 8, x : x + 8] = COLOURS[name]
        _png(image, path / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\ta {name} square")
    (path / "captions.txt").write_text("\n".join(lines) + "\n")
    return path


def make_ddpm_pipeline(path: Path) -> Path:
    """A random 8×8 one-channel ``DDPMPipeline`` saved with ``save_pretrained``."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        path, safe_serialization=True
    )
    return path


def make_sd_pipeline(path: Path) -> Path:
    from diffattr.text2image.pipeline import write_tiny_pipeline

    return write_tiny_pipeline(path, seed=0, sample_size=8)


def make_lora(pipeline: Path, out: Path) -> Path:
    """LoRA adapters on the pipeline's UNet, saved as diffusers' training scripts save them."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    return out


def make_emoji_data(root: Path, n: int = 20) -> Path:
    """The built-in ``emoji`` set installed from a stand-in package of n coloured discs."""
    from PIL import Image

    from diffattr.data import emoji

    rng = np.random.default_rng(0)
    categories = ["Smileys & Emotion", "People & Body", "Symbols"]
    meta, files = [], {}
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        a = np.zeros((64, 64, 4), np.uint8)
        cy, cx = rng.integers(20, 44, 2)
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < 16**2] = (*rng.integers(0, 256, 3), 255)
        buf = io.BytesIO()
        Image.fromarray(a, "RGBA").save(buf, format="PNG")
        name = f"1f{600 + i:03x}.png"
        files[f"package/img/google/64/{name}"] = buf.getvalue()
        meta.append({"name": f"DISC {i}", "image": name, "category": categories[i % 3],
                     "sort_order": i})  # fmt: skip
    files["package/emoji.json"] = json.dumps(meta).encode()
    files["package/LICENSE"] = b"MIT licence text"
    tgz = root / "emoji-package.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    emoji.install(tgz, root=root / "data", sha256=digest)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The shape of runs/demo after `make demo`, in seconds: 16 digits, 2 steps, 2 samples
    scored with DAS and pixel cosine, and the report."""
    from diffattr.cli import main

    run = tmp_path_factory.mktemp("docs") / "run"
    quiet = ["--quiet", "--threads", "1"]
    train = ["train", "--data", "digits", "--train-count", "16", "--val-count", "4",
             "--steps", "2", "--batch-size", "8", "--out", str(run)]  # fmt: skip
    assert main([*train, *quiet]) == 0
    assert main(["generate", str(run), "--num", "2", "--steps", "4", *quiet]) == 0
    assert main(["score", str(run), "--method", "das,pixel-cos", *quiet]) == 0
    assert main(["report", str(run), *quiet]) == 0
    return run


@pytest.fixture(scope="session")
def emoji_root(tmp_path_factory) -> Path:
    return make_emoji_data(tmp_path_factory.mktemp("emoji"))


# --------------------------------------------------------------------------------- runner
def prepare(block: Block, where: Path, request) -> None:
    """Make the files the block's fixture directives ask for, in ``where``."""
    pipeline = None
    for key, value in sorted(block.fixtures, key=lambda kv: kv[0] == "lora"):
        if key == "file":
            path, _, text = value.partition(":")
            target = where / path.strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text.strip() + "\n")
            continue
        target = where / value
        target.parent.mkdir(parents=True, exist_ok=True)
        if key == "run":
            shutil.copytree(request.getfixturevalue("tiny_run"), target, symlinks=True)
        elif key == "repo":
            source = ROOT / value
            assert source.exists(), f"{block.where}: repo={value} is not in the repository"
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            else:
                shutil.copy2(source, target)
        elif key == "images":
            make_images(target)
        elif key == "captioned":
            make_captioned(target)
        elif key == "ddpm-pipeline":
            make_ddpm_pipeline(target)
        elif key == "sd-pipeline":
            pipeline = make_sd_pipeline(target)
        elif key == "lora":
            assert pipeline is not None, f"{block.where}: lora= needs an sd-pipeline= directive"
            make_lora(pipeline, target)


def substituted(block: Block) -> str:
    code = block.code
    for old, new in block.substitutions:
        assert old in code, f"{block.where}: substitution {old!r} does not occur in the block"
        code = code.replace(old, new)
    return code


def shell_lines(code: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, blank and comment lines dropped."""
    out, current = [], ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def skipped_by_rule(argv: list[str]) -> bool:
    name = Path(argv[0]).name
    if name in SKIPPED_COMMANDS:
        return True
    return name.startswith("python") and argv[1:3] == ["-m", "pip"]


def run_shell(block: Block, code: str) -> None:
    from diffattr.cli import main

    for line in shell_lines(code):
        argv = shlex.split(line, comments=True)
        if not argv or skipped_by_rule(argv):
            print(f"$ {line}  (not run: set-up, install or download)")
            continue
        start = time.perf_counter()
        if Path(argv[0]).name == "diffattr":
            try:
                rc = main(argv[1:])
            except SystemExit as exc:  # argparse refusing the line
                rc = exc.code
            assert rc == 0, f"{block.where}: `{line}` exited with {rc} (stderr above)"
        else:
            proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True)
            assert proc.returncode == 0, (
                f"{block.where}: `{line}` exited with {proc.returncode}: {proc.stderr}"
            )
        print(f"$ {line}  ({time.perf_counter() - start:.1f} s)")


def run_chain(chain: list[Block], where: Path, request, monkeypatch) -> None:
    monkeypatch.chdir(where)
    namespace: dict = {"__name__": "__docs__"}
    for block in chain:
        if block.has("emoji"):
            monkeypatch.setenv("DIFFATTR_DATA_DIR", str(request.getfixturevalue("emoji_root")))
        prepare(block, where, request)
        code = substituted(block)
        if block.lang in PYTHON:
            exec(compile(code, block.where, "exec"), namespace)
        else:
            run_shell(block, code)


# ---------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("chain", CHAINS, ids=[c[0].where for c in CHAINS])
def test_code_block_runs(chain, tmp_path, request, monkeypatch):
    reason = chain[0].skip_reason
    if reason:
        pytest.skip(f"{chain[0].where}: {reason}")
    run_chain(chain, tmp_path, request, monkeypatch)


def test_a_broken_block_fails(tmp_path, request, monkeypatch):
    """The runner does not swallow failures: a misspelt option, a failing shell line, a Python
    error and a stale substitution each fail."""
    page = tmp_path / "page.md"
    for body in (
        "```bash\ndiffattr train --no-such-option 3 --out x\n```\n",
        "```bash\nls does-not-exist\n```\n",
        "```python\nfrom diffattr.run import NoSuchName\n```\n",
        "<!-- docs-test: --steps 9 => --steps 2 -->\n```bash\nls\n```\n",
    ):
        page.write_text(body)
        blocks, problems = parse(page)
        assert not problems and len(blocks) == 1
        with pytest.raises((AssertionError, ImportError)):
            run_chain(blocks, tmp_path, request, monkeypatch)


def test_directives_are_known_and_attached():
    problems = [p for page in PAGES for p in parse(page)[1]]
    assert not problems, "\n".join(problems)


def test_every_block_declares_a_language():
    unnamed = [b.where for page in PAGES for b in parse(page)[0] if not b.lang]
    assert not unnamed, f"fenced blocks without a language (python, bash or text): {unnamed}"
    unknown = [f"{b.where} ({b.lang})" for page in PAGES for b in parse(page)[0]
               if b.lang not in PYTHON | SHELL | NOT_RUN]  # fmt: skip
    assert not unknown, f"blocks of a language the docs test does not know: {unknown}"


def test_skips_are_few_and_give_reasons():
    skipped = [b for page in PAGES for b in parse(page)[0] if b.skip_reason]
    assert len(skipped) <= 4, [b.where for b in skipped]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_links_stay_inside_the_repository():
    """Relative links resolve to files of the repository; nothing names a path above it."""
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        if "../shared" in text:
            bad.append(f"{page.name}: names ../shared")
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the page
            path = (page.parent / target.split("#")[0]).resolve()
            if ROOT not in path.parents and path != ROOT:
                bad.append(f"{page.name}: {target} points outside the repository")
            elif not path.exists():
                bad.append(f"{page.name}: {target} does not exist")
    assert not bad, "\n".join(bad)


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    src = ROOT / "src" / "diffattr"
    missing = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if path.name == "__init__.py":
            if path.parent == src:
                continue
            name = f"{path.parent.relative_to(src).as_posix()}/"  # a package: `data/`
        else:
            name = rel
        if f"`{name}`" not in text:
            missing.append(name)
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()
