"""Every command in the user guides is run or parsed here, so no guide command goes stale.

Convention for fenced code blocks in ``docs/guides/*.md`` (the info string after the backticks):

- ``bash``: run. A guide's blocks run in order, each in a fresh ``bash`` with
  ``set -Eeuo pipefail``, all in one empty temporary folder per guide. A block may use files
  that earlier blocks of the same guide wrote, never files of another guide.
- ``python``: run in the same folder and order, as ``python block.py``.
- ``bash needs=TOOL``: run like ``bash`` when TOOL is on PATH (e.g. ``benchmark_app``),
  skipped otherwise.
- ``bash device``: not run; for commands that need hardware or software this machine lacks
  (a Jetson, an NVIDIA GPU, TensorRT).
- anything else (``text`` for printed output, ``yaml``...): neither run nor checked.

Every command that starts with ``edgeq`` in any ``bash`` block of the guides and of
docs/JETSON.md (whose commands need a device and are never run) is also parsed with edgeq's
own argparse parser (``edgeq.cli.build_parser``) without being executed, so a renamed or
removed option fails the default run even where the guide itself is too slow for it.

The blocks see ``EDGEQ_REPO`` (the repository root), ``EDGEQ_CACHE`` (a temporary cache), and a
PATH that starts with this interpreter's folder, so ``edgeq`` and ``python`` are the ones
under test. Guides that take minutes are in ``SLOW_GUIDES`` and run with ``-m slow``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
PARSE_ONLY_DOCS = [ROOT / "docs" / "JETSON.md"]
SLOW_GUIDES = {"bring-your-own-checkpoint.md", "openvino-cpu.md"}
BLOCK_TIMEOUT_S = 1200
TAIL = 4000
OPERATOR_CHARS = set("();<>|&")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    body: str

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    @property
    def needs(self) -> str | None:
        """The tool a ``bash needs=TOOL`` block needs, else None."""
        match = re.fullmatch(r"bash needs=(\S+)", self.info)
        return match.group(1) if match else None

    @property
    def meant_to_run(self) -> bool:
        return self.info in ("bash", "python") or self.needs is not None

    @property
    def runnable(self) -> bool:
        return self.meant_to_run and (self.needs is None or shutil.which(self.needs) is not None)

    @property
    def is_shell(self) -> bool:
        return self.info.split(" ")[0] == "bash"


def code_blocks(path: Path) -> list[Block]:
    """Fenced blocks of a Markdown file, indented ones (inside list items) included."""
    blocks, open_block, indent, lines = [], None, "", []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if open_block is None and stripped.startswith("```"):
            open_block, indent, lines = (number, stripped[3:].strip()), line[: len(line) - len(line.lstrip())], []
        elif open_block is not None and stripped == "```":
            blocks.append(Block(path, open_block[0], open_block[1], "\n".join(lines) + "\n"))
            open_block = None
        elif open_block is not None:
            lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
    assert open_block is None, f"{path}:{open_block[0]}: unclosed code block"
    return blocks


def edgeq_commands(block: Block) -> list[list[str]]:
    """The argument lists of the ``edgeq`` commands in a shell block (continuations joined)."""
    text = re.sub(r"\\\n", " ", block.body)
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:  # an unbalanced quote: a typo the parser would miss
            raise AssertionError(f"{block.where}: cannot split {line!r}: {exc}") from None
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if set(token) <= OPERATOR_CHARS:
                if token[0] in "<>" and segment and segment[-1].isdigit():
                    segment.pop()  # the 2 of 2>&1
                words = [w for w in segment if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]  # FOO=bar edgeq ...
                if words and words[0] == "edgeq":
                    commands.append(words[1:])
                segment = []
            else:
                segment.append(token)
    return commands


def parse_error(argv: list[str]) -> str | None:
    """None when edgeq's parser accepts ``argv`` (nothing runs), else its error message."""
    from edgeq.cli_args import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip() or f"exit {exc.code}"
    return None if getattr(args, "handler", None) else "no command given"


def guide_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EDGEQ_REPO=str(ROOT),
        EDGEQ_CACHE=str(tmp_path / "edgeq-cache"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        TQDM_DISABLE="1",  # progress bars would fill the output tail of a failure
    )
    return env


def run_block(block: Block, workdir: Path, env: dict[str, str]) -> None:
    """Run one block in ``workdir``; a non-zero exit fails with the command and the output tail."""
    scripts = workdir.parent / "guide-blocks"
    scripts.mkdir(exist_ok=True)
    script = scripts / f"block-{block.line}"
    if block.info == "python":
        script.write_text(block.body, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:
        trap = "trap 'echo \"guide command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n"
        script.write_text("set -Eeuo pipefail\n" + trap + block.body, encoding="utf-8")
        argv = ["bash", str(script)]
    try:
        proc = subprocess.run(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{block.where}: block timed out after {BLOCK_TIMEOUT_S} s\n{block.body}\n"
                    f"--- output tail ---\n{out[-TAIL:]}")
    if proc.returncode != 0:
        failed = re.findall(r"guide command failed \(exit \d+\): (.*)", proc.stdout)
        command = failed[-1] if failed else block.body.strip()
        pytest.fail(f"{block.where}: exit {proc.returncode} from: {command}\n--- output tail ---\n{proc.stdout[-TAIL:]}")


def guide_files() -> list[Path]:
    return sorted(p for p in GUIDES.glob("*.md") if p.name != "README.md")


def _guide_params() -> list:
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW_GUIDES else [])
            for p in guide_files() if any(b.meant_to_run for b in code_blocks(p))]


# ----------------------------------------------------------------------------- tests
def test_guides_exist_and_are_indexed():
    index = (GUIDES / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([^)#]+\.md)\)", index))
    files = {p.name for p in guide_files()}
    assert files, "no guides in docs/guides"
    assert files <= linked, f"guides missing from docs/guides/README.md: {sorted(files - linked)}"
    for target in linked:
        assert (GUIDES / target).resolve().is_file(), f"docs/guides/README.md links to a missing {target}"
    assert "docs/guides/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert set(SLOW_GUIDES) <= files, f"SLOW_GUIDES names a guide that does not exist: {SLOW_GUIDES - files}"


def test_every_guide_command_parses():
    checked, errors = 0, []
    for path in [*guide_files(), GUIDES / "README.md", *PARSE_ONLY_DOCS]:
        for block in code_blocks(path):
            if not block.is_shell:
                continue
            for argv in edgeq_commands(block):
                checked += 1
                error = parse_error(argv)
                if error:
                    errors.append(f"{block.where}: edgeq {shlex.join(argv)}\n  {error.splitlines()[-1]}")
    assert not errors, "guide commands edgeq's parser rejects:\n" + "\n".join(errors)
    assert checked >= 15, f"only {checked} edgeq commands found: is the block convention still followed?"


@pytest.mark.parametrize("guide", _guide_params())
def test_guide_runs(guide: Path, tmp_path: Path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = guide_env(tmp_path)
    blocks = [b for b in code_blocks(guide) if b.meant_to_run]
    for block in blocks:
        if block.runnable:
            run_block(block, workdir, env)
        else:
            warnings.warn(f"{block.where} not run: {block.needs} is not installed", stacklevel=1)


# ----------------------------------------------------------------------------- the checker itself
def test_checker_fails_on_a_failing_command_and_a_bad_option(tmp_path):
    """The guards above can fail: a non-zero exit names its command; an unknown option is caught."""
    doc = tmp_path / "guide.md"
    (tmp_path / "work").mkdir()
    doc.write_text("```bash\necho fine\nfalse --flag  # fails\necho never\n```\n"
                   "```bash device\nedgeq export best.pt --int8 --no-such-option \\\n  --out q/ 2>&1 && edgeq info\n```\n"
                   "```bash needs=no-such-tool-here\nno-such-tool-here\n```\n")
    run, device, needs = code_blocks(doc)
    assert run.runnable and not device.meant_to_run and device.is_shell
    assert needs.meant_to_run and not needs.runnable
    with pytest.raises(pytest.fail.Exception, match=r"exit 1 from: false --flag"):
        run_block(run, tmp_path / "work", guide_env(tmp_path))
    commands = edgeq_commands(device)
    assert commands == [["export", "best.pt", "--int8", "--no-such-option", "--out", "q/"], ["info"]]
    assert "unrecognized arguments: --no-such-option" in parse_error(commands[0])
    assert parse_error(commands[1]) is None
