"""The documentation keeps its promises: a short README whose first code block is what CI runs, links and anchors
that resolve, commands that name files and modules that exist, train.py command lines that parse, and the demo
command's smoke form writing what the README says it writes."""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300
LAUNCHERS = {"python", "python3", "torchrun", "deepspeed"}
INLINE_CODE = r"`((?:[^`\n]|\n(?!\n))+)`"  # an inline code span, possibly wrapped over lines of one paragraph


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def split_code(text: str) -> tuple[list[list[str]], str]:
    """(fenced code blocks as lists of lines, the prose with every code block blanked out, line count kept)."""
    blocks, prose, current = [], [], None
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
            prose.append("")
        elif current is not None:
            current.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert current is None, "a code block is not closed"
    return blocks, "\n".join(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markdown stripped, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_code(read(path))[1].split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    prose = split_code(read(path))[1]
    prose = re.sub(INLINE_CODE, "", prose)  # inline code is not a link
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def first_code_block(path: Path) -> list[str]:
    blocks = split_code(read(path))[0]
    assert blocks, f"{path.name} has no code block"
    return blocks[0]


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).strip()


def shown_commands(path: Path) -> list[str]:
    """Command lines of the code blocks (continuations joined, comments dropped) and of the inline code spans."""
    blocks, prose = split_code(read(path))
    lines = []
    for block in blocks:
        joined = ""
        for line in block:
            if line.lstrip().startswith("#"):
                continue
            joined += strip_comment(line) if not line.rstrip().endswith("\\") else line.rstrip()[:-1] + " "
            if not line.rstrip().endswith("\\"):
                lines.append(joined.strip())
                joined = ""
    lines += [" ".join(span.split()) for span in re.findall(INLINE_CODE, prose)]
    out = []
    for line in lines:
        out += [part.strip() for part in re.split(r"&&|;|\|", line) if part.strip()]
    return out


def tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def target(command: str):
    """('module', name) or ('file', path) a launcher command runs, or None when it is not a launcher command."""
    tok = tokens(command)
    if tok[:2] == ["accelerate", "launch"]:
        tok = tok[1:]
    elif not tok or tok[0] not in LAUNCHERS:
        return None
    if "-m" in tok[1:]:
        i = tok.index("-m")
        return ("module", tok[i + 1]) if i + 1 < len(tok) else ("module", "")
    scripts = [t for t in tok[1:] if t.endswith(".py")]
    return ("file", scripts[0]) if scripts else None


def module_exists(name: str) -> bool:
    parts = name.split(".")
    if parts[0] and (REPO / parts[0]).is_dir():
        base = REPO.joinpath(*parts)
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return bool(name) and importlib.util.find_spec(name) is not None


def test_readme_is_short():
    n = len(read(README).rstrip("\n").split("\n"))
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move details to docs/ (at most {MAX_README_LINES})"


def test_first_code_block_is_install_demo_and_install_test():
    commands = [strip_comment(line) for line in first_code_block(README) if line.strip()]
    assert commands == ['pip install -e ".[demo]" && python train.py', 'pip install -e ".[dev]" && python -m pytest -q']


def test_ci_extracts_the_readme_test_command():
    """.ci/run reads the test command out of the README's first code block: run its own extraction."""
    ci = read(REPO / ".ci" / "run")
    m = re.search(r"test_cmd=\$\((awk .*README\.md)\)", ci)
    assert m, ".ci/run no longer extracts the test command with awk from README.md; update this test"
    if shutil.which("awk") is None:
        pytest.skip("awk is not installed")
    out = subprocess.run(["bash", "-c", m.group(1)], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'pip install -e ".[dev]" && python -m pytest -q'


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    found = links(page)
    broken = []
    for link in found:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or REPO not in (dest, *dest.parents):
            broken.append(f"{link}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{link}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_checker_can_fail(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# A `b` (c): d\n\n[x](p.md#a-b-c-d) [y](#nope) [z](missing.md) `[w](ignored.md)`\n```\n# not\n```\n"
    )
    assert anchors(page) == {"a-b-c-d"} and links(page) == ["p.md#a-b-c-d", "#nope", "missing.md"]


def test_readme_maps_every_docs_page():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md's documentation map does not link docs/{missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_commands_name_files_and_modules_that_exist(page):
    targets = [(c, target(c)) for c in shown_commands(page)]
    targets = [(c, t) for c, t in targets if t]
    if page == README:
        assert len(targets) >= 10, "the README's commands were not found; the parser in this test is broken"
    bad = [
        c for c, (kind, name) in targets if not (module_exists(name) if kind == "module" else (REPO / name).is_file())
    ]
    assert not bad, f"{page.name} shows commands whose file or module does not exist: {bad}"


def readme_train_commands() -> list[list[str]]:
    """The train.py argument lists of the README's complete commands (no `...` placeholder)."""
    out = []
    for command in shown_commands(README):
        t = target(command)
        tok = tokens(command)
        if t == ("file", "train.py") and "..." not in tok:
            out.append(tok[tok.index("train.py") + 1 :])
    return out


def test_readme_train_commands_resolve(monkeypatch, capsys):
    from repa_fast.cli import main

    commands = readme_train_commands()
    assert [] in commands and len(commands) >= 4  # the demo, and the recipe commands
    monkeypatch.chdir(REPO)  # configs/... paths are relative to the repository
    for argv in commands:
        if "--help" in argv:
            with pytest.raises(SystemExit) as stop:
                main(argv)
            assert stop.value.code == 0 and "--max-train-steps" in capsys.readouterr().out
            continue
        assert main([*argv, "--dry-run"]) == 0, f"python train.py {' '.join(argv)} --dry-run failed"
        resolved = json.loads(capsys.readouterr().out)
        assert resolved["trainer"]["model"].startswith("SiT-")


@pytest.mark.slow  # 17-29 s measured on a shared, loaded 2-core machine; CI runs it (no marker is deselected)
def test_demo_command_smoke(tmp_path):
    """The README's first command, `python train.py`, run in an empty directory for 2 steps at batch 16 (and a
    2-step preview sampler): it must write the files the README's table lists. The digits-ssl encoder's own training
    is tested in tests/eval/test_demo_encoder.py; here a random-weight file stands in its cache (HOME is the temp
    directory), so that the run takes seconds rather than the half minute the encoder's training would add."""
    from safetensors.torch import save_file

    from repa_fast.models import digits_encoder as de

    demo = next(strip_comment(line) for line in first_code_block(README) if "[demo]" in line)
    argv = tokens(demo.split("&&", 1)[1])
    assert argv == ["python", "train.py"]
    cache = tmp_path / "home" / ".cache" / "repa_fast" / "encoders"
    cache.mkdir(parents=True)
    enc = de.DigitsEncoder(16, 8)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(cache / de.FILE))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        str(REPO / argv[1]),
        "--max-train-steps",
        "2",
        "--preview-num-steps",
        "2",
        "--batch-size",
        "16",
    ]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = work / "demo_out" / "demo"
    for name in ("config.json", "log.jsonl", "train.log", "loss_curve.png", "samples/0000002.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert any((run / "tensorboard").iterdir())
    ckpt = run / "checkpoints" / "0000002"
    for name in ("model.safetensors", "ema.safetensors", "state.pt", "rng/rank0.pt"):
        assert (ckpt / name).is_file() and (ckpt / name).stat().st_size > 0, name
    trainer = json.loads(read(run / "config.json"))["trainer"]
    assert (trainer["model"], trainer["dataset"], trainer["max_train_steps"], trainer["batch_size"]) == (
        "SiT-T/2",
        "digits",
        2,
        16,
    )
    (last,) = [json.loads(line) for line in read(run / "log.jsonl").splitlines() if line.strip()]
    assert last["step"] == 2 and last["skipped_steps"] == 0
    assert all(math.isfinite(last[k]) for k in ("loss", "denoising", "alignment", "grad_norm"))
    # The logged total is the REPA objective, denoising + proj_coeff x alignment (docs/objective.md §Total loss and
    # precision).
    total = last["denoising"] + trainer["proj_coeff"] * last["alignment"]
    assert last["loss"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert -1.0 <= last["alignment"] <= 1.0 and last["denoising"] > 0  # a negative cosine similarity, a squared error
