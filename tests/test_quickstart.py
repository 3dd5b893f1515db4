"""The README's first command, `reshard quickstart`, end to end in an empty directory.

CI also runs it on a base install; this copy catches a break (a step's arguments out of
step with its command) in the test run itself.
"""

from __future__ import annotations

import subprocess

from helpers_cli import reshard_cmd


def test_quickstart_runs_every_step(tmp_path, reshard_cache):
    result = subprocess.run(
        [*reshard_cmd(), "quickstart"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("convert", "verify", "validate", "run"):
        assert f"$ reshard {step}" in result.stderr, step
    assert "-> OK" in result.stdout
    assert "tokens/s on ep2tp2" in result.stderr
    assert (tmp_path / "tiny-ep2tp2" / "reshard.json").is_file()
