"""The `trimem` command line: help, subcommands and error reporting without tracebacks."""
import subprocess
import sys

import pytest

from trimem.host import cli

pytestmark = pytest.mark.unit


def test_help_lists_every_registered_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("hw", "asm", "disasm", "compile", "run", "hdl", "sim", "cosim", "demo",
                 "generate", "compare", "study", "roofline", "sweep"):
        assert f"    {name}" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: trimem" in capsys.readouterr().out


def test_console_script_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "trimem.host.cli", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("trimem ")


def test_user_errors_are_one_line_without_traceback(capsys):
    assert cli.main(["hw", "show", "no-such-preset"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trimem hw: error: ") and "Traceback" not in err
