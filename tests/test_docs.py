"""The documentation is part of the product: the site builds without a warning, its API
reference covers the public API, the tutorial and the README's example run exactly as
written (and print what they say they print), and CI runs the README's test command."""

from __future__ import annotations

import ast
import html
import inspect
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "ckptable"

#: The README's two set-up commands. The test command is also what `.ci/run` runs.
MAIN_JOB_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[cli]' && .venv/bin/ckptable demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest"
)


# --- Markdown code blocks ---------------------------------------------------------------


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    lang: str
    code: str
    line: int  # 1-based line of the block's first code line
    output: str | None = None  # the text block documented as this block's output


_FENCE = re.compile(r"^(```+)\s*([\w+-]*)")


def code_blocks(markdown: str) -> list[Block]:
    """The fenced blocks of ``markdown``, in order. A ```text block that follows a python
    block with only blank lines and an "Output:" line between them is that block's
    expected output, not a block of its own."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    between: list[str] = []  # the lines since the previous block closed
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            between.append(lines[i])
            i += 1
            continue
        fence, lang = match.group(1), match.group(2)
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"line {i + 1}: a code block is never closed")
        block = Block(lang, "\n".join(lines[i + 1 : end]) + "\n", i + 2)
        glue = {line.strip() for line in between} - {""}
        if lang == "text" and blocks and blocks[-1].lang == "python" and glue == {"Output:"}:
            blocks[-1].output = block.code
        else:
            blocks.append(block)
        between = []
        i = end + 1
    return blocks


def output_matches(expected: str, actual: str) -> bool:
    """``actual == expected``, where ``...`` in ``expected`` stands for any text."""
    parts = [re.escape(part) for part in expected.strip().split("...")]
    return re.fullmatch(".*?".join(parts), actual.strip(), flags=re.DOTALL) is not None


#: Runs blocks in order in one namespace, ``__main__``'s, as one script would, and
#: records each block's standard output. Code keeps its Markdown line numbers, so a
#: traceback points at the line of the page.
_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    _blocks, _outputs = json.load(open(sys.argv[1])), []
    for _block in _blocks:
        _buffer = io.StringIO()
        try:
            _code = compile("\\n" * (_block["line"] - 1) + _block["code"], _block["file"], "exec")
            with contextlib.redirect_stdout(_buffer):
                exec(_code, globals())
        except BaseException:
            _outputs.append(_buffer.getvalue())
            json.dump(_outputs, open(sys.argv[2], "w"))
            traceback.print_exc()
            sys.exit(1)
        _outputs.append(_buffer.getvalue())
    json.dump(_outputs, open(sys.argv[2], "w"))
    """
)


def run_blocks(blocks: list[Block], source: Path, workdir: Path) -> list[str]:
    """Run ``blocks`` in a fresh interpreter in ``workdir``; return each one's stdout."""
    blocks_file, outputs_file = workdir / ".blocks.json", workdir / ".outputs.json"
    blocks_file.write_text(
        json.dumps([{"code": b.code, "line": b.line, "file": str(source)} for b in blocks])
    )
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(blocks_file), str(outputs_file)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs = json.loads(outputs_file.read_text()) if outputs_file.exists() else []
    assert result.returncode == 0, (
        f"block {len(outputs)} of {source.name} (line {blocks[len(outputs) - 1].line}) "
        f"failed:\n{result.stderr}\n--- its output ---\n{outputs[-1] if outputs else ''}"
    )
    return [str(output) for output in outputs]


def check_outputs(blocks: list[Block], outputs: list[str], source: Path) -> None:
    """Each block printed exactly its documented output, or nothing if none is shown."""
    assert len(outputs) == len(blocks)
    for block, actual in zip(blocks, outputs, strict=True):
        where = f"{source.name}, the block at line {block.line}"
        if block.output is None:
            assert actual == "", f"{where} prints output the page does not show:\n{actual}"
        else:
            assert output_matches(block.output, actual), (
                f"{where} prints\n{actual}\nbut the page says\n{block.output}"
            )


def test_code_blocks_and_output_blocks_are_told_apart() -> None:
    markdown = textwrap.dedent(
        """
        ```python
        print(1)
        ```

        Output:

        ```text
        1
        ```

        ```text
        a tree, not an output
        ```
        """
    )
    blocks = code_blocks(markdown)
    assert [(b.lang, b.output) for b in blocks] == [("python", "1\n"), ("text", None)]
    assert blocks[0].line == 3
    assert output_matches(".../agent\nis ... here", "/tmp/x/agent\nis over\nthere here")
    assert not output_matches("exactly this", "exactly this and more")


# --- The site ---------------------------------------------------------------------------


def page_text(page: Path) -> str:
    """The visible text of an HTML page, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))
    return " ".join(text.split())


def first_sentence(obj: object) -> str:
    """The first line of ``obj``'s docstring as it is rendered (without code markup)."""
    doc = inspect.getdoc(obj)
    assert doc, f"{obj!r} has no docstring"
    return " ".join(doc.split("\n\n")[0].replace("``", "").replace("`", "").split())


def text_in(needle: str, haystack: str) -> bool:
    """Whether ``needle`` is in ``haystack``, ignoring whitespace (HTML splits around code)."""
    return "".join(needle.split()) in "".join(haystack.split())


def public_names(module_file: Path) -> list[str]:
    """The ``__all__`` of a module, read from its source (without importing it)."""
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module_file} has no __all__")


def test_site_builds_strictly_and_documents_the_api(site: Path) -> None:
    from ckptable import Checkpointable, CheckpointManager

    reference = "\n".join(page_text(p) for p in sorted((site / "reference").rglob("*.html")))
    assert text_in(first_sentence(Checkpointable.save_to_path), reference)
    assert text_in(first_sentence(Checkpointable.from_checkpoint), reference)
    assert text_in(first_sentence(CheckpointManager), reference)
    # The offline plugin builds page.html rather than page/index.html, so that the site
    # also works opened from the file system.
    assert (site / "tutorial.html").exists()
    assert (site / "img" / "storage_formats.png").exists()


def test_api_reference_covers_every_public_name(site: Path) -> None:
    anchors: set[str] = set()
    for page in (site / "reference").rglob("*.html"):
        anchors.update(re.findall(r'id="(ckptable[\w.]*)"', page.read_text(encoding="utf-8")))
    testing = SRC / "testing.py"
    if not testing.exists():
        testing = SRC / "testing" / "__init__.py"
    modules = {
        "ckptable": SRC / "__init__.py",
        "ckptable.errors": SRC / "errors.py",
        "ckptable.ray": SRC / "ray" / "__init__.py",
        "ckptable.testing": testing,
    }
    expected = {
        f"{module}.{name}"
        for module, source in modules.items()
        for name in public_names(source)
        if name != "__version__"
    }
    # The errors are documented once, in ckptable.errors, and re-exported by ckptable.
    errors = {f"ckptable.{name}" for name in public_names(SRC / "errors.py")}
    expected = (expected - errors) | {"ckptable.CheckpointManager", "ckptable.save_async"}
    assert sorted(expected - anchors) == []


def test_built_pages_keep_the_benchmark_plot(site: Path) -> None:
    page = (site / "benchmarks.html").read_text(encoding="utf-8")
    assert 'src="img/storage_formats.png"' in page


# --- The tutorial -----------------------------------------------------------------------


def test_tutorial_runs_as_written_and_prints_what_it_shows(tmp_path: Path) -> None:
    source = DOCS / "tutorial.md"
    blocks = [b for b in code_blocks(source.read_text()) if b.lang == "python"]
    assert len(blocks) >= 8
    check_outputs(blocks, run_blocks(blocks, source, tmp_path), source)
    # It saved where it says, relative to the working directory.
    assert (tmp_path / "checkpoints" / "agent" / "policy" / "layer0").is_dir()


# --- The README -------------------------------------------------------------------------


def readme_lead() -> tuple[list[Block], str]:
    """The README's code blocks before its first table, and that part's text."""
    text = (ROOT / "README.md").read_text()
    lead = text.split("\n|", 1)[0]
    return code_blocks(lead), lead


def test_readme_leads_with_the_two_commands_and_a_short_example() -> None:
    blocks, lead = readme_lead()
    assert [b.lang for b in blocks[:3]] == ["bash", "bash", "python"], blocks
    assert blocks[0].code.strip() == MAIN_JOB_COMMAND
    assert blocks[1].code.strip() == TEST_COMMAND
    assert len(blocks[2].code.strip().splitlines()) <= 15
    assert lead.index(MAIN_JOB_COMMAND) < lead.index(TEST_COMMAND)


def test_readme_example_runs_as_is(tmp_path: Path) -> None:
    example = readme_lead()[0][2]
    outputs = run_blocks([example], ROOT / "README.md", tmp_path)
    check_outputs([example], outputs, ROOT / "README.md")
    assert (tmp_path / "checkpoints" / "model" / "optimizer").is_dir()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [
        line.strip()
        for line in script
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    readme_command = readme_lead()[0][1].code.strip()
    # Its last command is the README's; the ones before it only install what the tests
    # need from the system (Chromium, for tests/test_docs_browser.py).
    assert commands[-1] == readme_command
    assert all("apt-get install" in command for command in commands[:-1]), commands
    assert any("chromium" in command for command in commands[:-1]), commands
