"""tools/fault_injection.py (the README's reliability table) still runs: two of its cases, end to end."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fault_injection_tool_runs_its_cases_and_prints_the_table():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "fault_injection.py"), "--only", "manifest"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| 5 sentences | manifest not UTF-8 | exit 1 naming COMPLETE | pass |" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("2 of 2 cases behaved as expected")
