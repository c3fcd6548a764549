"""``edge --help`` stays light, and the manual page and shell completions generated from the parser work.

Help is checked in real processes with ``python -X importtime``: the list of modules a process imported is
deterministic where its wall time is not, so the test asserts what was imported and leaves timing to the report.
The generator (tools/gen_cli_docs.py) runs into a temporary directory; its bash completion is sourced by a real bash
and asked what ``edge fl<TAB>`` offers, and its manual page is rendered by groff with every warning enabled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli import _COMMANDS

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_cli_docs.py"
# What help must never load: the inference and crypto stacks, MQTT, TUF, CBOR, the fleet's drivers, and the
# configuration and logging machinery (edge.config alone took ~75 ms of a 190 ms `edge --help`).
HEAVY = (
    "numpy",
    "onnxruntime",
    "cryptography",
    "paho",
    "tuf",
    "securesystemslib",
    "cbor2",
    "psycopg",
    "prometheus_client",
    "av",
    "simplejpeg",
    "serial",
    "edge.config",
    "edge.log",
    "edge.toml_config",
    "edge.service",
    "edge.inference.model",
    "edge.fleet.config",
    "edge.fleet.store",
    "edge.fleet.pki",
    # The standard library's heaviest: dataclasses (with inspect) alone costs ~15 ms. A verb module that needs it
    # imports it in the function that runs the verb.
    "dataclasses",
)
FLEET_VERBS = ("fleet", "gateway")


def imported_for(*argv: str) -> list[str]:
    """The modules ``python -X importtime -m edge ARGV`` imported (it must exit 0 and print a usage)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIMPORTTIME"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "edge", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: edge"), proc.stdout[:500]
    modules = [m[1] for m in re.finditer(r"^import time:\s*\d+ \|\s*\d+ \|\s*(\S+)", proc.stderr, re.M)]
    # The parse found the list: edge.cli itself is in it (an empty list would pass every check below).
    assert "edge.cli" in modules, proc.stderr[:2000]
    return modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *[[verb, "--help"] for verb in _COMMANDS],
        ["fleet", "--help"],
        ["fleet", "status", "--help"],
        ["fleet", "models", "--help"],
        ["gateway", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    modules = imported_for(*argv)
    assert not heavy(modules), f"edge {' '.join(argv)} imported {heavy(modules)}"


def test_box_verb_help_does_not_build_the_fleets_parsers() -> None:
    modules = imported_for("run", "--help")
    assert not [m for m in modules if m.startswith("edge.fleet")], modules


# ---------------------------------------------------------------- the generated manual page and completions


def generate(out: Path, *flags: str, columns: int = 80) -> None:
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), str(out), "--date", "2026-01-02", *flags],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": str(columns)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("edge.1", "completions/edge.bash", "completions/_edge"):
        assert str(out / name) in proc.stdout.split(), proc.stdout


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-docs")
    generate(out)
    return out


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-docs-box")
    generate(out, "--box")
    return out


def test_output_does_not_depend_on_the_terminal(tmp_path: Path) -> None:
    # tools/deb/build.py runs the generator wherever it is built: the package must stay reproducible.
    generate(tmp_path / "narrow", "--box", columns=50)
    generate(tmp_path / "wide", "--box", columns=250)
    for name in ("edge.1", "completions/edge.bash", "completions/_edge"):
        assert (tmp_path / "narrow" / name).read_bytes() == (tmp_path / "wide" / name).read_bytes(), name


def complete(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What the bash completion ``script`` offers for the command line ``words`` (the last one being typed)."""
    text = script.read_text()
    function = re.search(r"^complete .*-F (\S+) edge$", text, re.M)
    assert function, "the script registers no completion function for edge"
    # As bash calls a completion function: COMP_WORDS/COMP_CWORD set, $1 the command, $2 the word, $3 the one before.
    line = " ".join(words)
    program = (
        f'source "$1"; COMP_WORDS=({" ".join(_quote(w) for w in words)}); COMP_CWORD={len(words) - 1}; '
        f"COMP_LINE={_quote(line)}; COMP_POINT={len(line)}; "
        f"{function[1]} edge {_quote(words[-1])} {_quote(words[-2])}; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program, "bash", str(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def test_bash_completion_is_valid_bash(full: Path, box: Path) -> None:
    for out in (full, box):
        proc = subprocess.run(
            ["bash", "-n", str(out / "completions/edge.bash")], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr


def test_bash_completion_offers_verbs_subverbs_and_options(full: Path) -> None:
    script = full / "completions/edge.bash"
    assert complete(script, "edge", "fl") == ["fleet"]
    assert complete(script, "edge", "fleet", "st") == ["status"]
    # After a global option of the fleet and its value, still its actions.
    assert "status" in complete(script, "edge", "fleet", "--dir", "/srv/fleet", "st")
    assert set(complete(script, "edge", "")) >= {*_COMMANDS, *FLEET_VERBS}
    assert "--frames" in complete(script, "edge", "run", "--")


def test_bash_completion_of_a_file_option_offers_paths(full: Path, tmp_path: Path) -> None:
    (tmp_path / "box.toml").write_text("")
    (tmp_path / "models").mkdir()
    assert complete(full / "completions/edge.bash", "edge", "run", "--config", "bo", cwd=tmp_path) == ["box.toml"]
    # A directory option offers directories only.
    assert complete(full / "completions/edge.bash", "edge", "ota", "status", "--data-dir", "", cwd=tmp_path) == [
        "models"
    ]


def test_box_completion_offers_no_fleet_verbs(box: Path) -> None:
    offered = complete(box / "completions/edge.bash", "edge", "")
    assert set(offered) >= set(_COMMANDS)
    assert not set(offered) & set(FLEET_VERBS), offered
    assert "fleet" not in (box / "completions/edge.bash").read_text()


def test_zsh_completion_is_a_compdef_for_edge(full: Path) -> None:
    text = (full / "completions/_edge").read_text()
    assert text.startswith("#compdef edge")
    for verb in (*_COMMANDS, *FLEET_VERBS):
        assert re.search(rf"^\s+{verb}:'", text, re.M), verb  # the command list: verb:'its help'


def sections(page: str) -> list[str]:
    return re.findall(r"^\.SS \\fB(.+?)\\fR", page, re.M)


def test_manpage_documents_every_verb(full: Path, box: Path) -> None:
    page = (full / "edge.1").read_text()
    assert page.startswith('.TH EDGE "1" "2026\\-01\\-02" "edge ')
    documented = sections(page)
    for verb in (*_COMMANDS, *FLEET_VERBS):
        assert f"edge {verb}" in documented, verb
    assert "edge fleet status" in documented and "edge ota update" in documented
    for heading in ("SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "ENVIRONMENT", "FILES"):
        assert re.search(rf"^\.SH\s+{heading}$", page, re.M), heading  # argparse-manpage writes ".SH\nCOMMANDS"

    box_page = (box / "edge.1").read_text()
    box_documented = sections(box_page)
    assert all(f"edge {verb}" in box_documented for verb in _COMMANDS)
    assert not [s for s in box_documented if s.split()[1] in FLEET_VERBS], box_documented


def render(page: Path) -> tuple[str, str]:
    """groff's text rendering of ``page`` and its warnings (every warning enabled)."""
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", str(page)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return re.sub(r".\x08", "", proc.stdout), proc.stderr  # without the overstrike of bold and underlined text


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (apt install groff-base)")
def test_manpage_renders_without_warnings(full: Path, box: Path) -> None:
    for out in (full, box):
        text, warnings = render(out / "edge.1")
        assert warnings == "", warnings
        # A help line that starts with "." (".onnx model") is text, not a request troff would drop.
        assert re.search(r"^\s+MODEL\s+\.onnx model$", text, re.M), "the line '.onnx model' is missing from the page"
        assert "EXIT STATUS" in text
    if shutil.which("man"):
        # lintian's check of a manual page.
        proc = subprocess.run(
            ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(box / "edge.1")],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80"},
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
