"""The walk-throughs a newcomer pastes (the `make dev` banner's and README's) run as they are against an AIQ."""

from __future__ import annotations

import re
import subprocess

from devkit.devstack import walkthrough
from devkit.paths import ROOT
from tests.support.stack import Stack

README = ROOT / "README.md"


def _bash_block(text: str, heading: str) -> str:
    """The first ```bash block after `heading`."""
    after = text[text.index(heading) :]
    match = re.search(r"```bash\n(.*?)```\n", after, re.DOTALL)
    assert match, f"no bash block after {heading!r}"
    return match.group(1)


def _paste(script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash as a user pasting it would (no `set -e`, no pipefail)."""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False)


def test_the_make_dev_banner_walkthrough_runs(stack: Stack) -> None:
    result = _paste(walkthrough(stack.api_url) + '\necho "QID=$QID REFRESH=${#REFRESH}"')
    assert result.returncode == 0, result.stderr
    assert '"status":"completed"' in result.stderr
    qid = re.search(r"QID=([0-9a-f-]{36}) REFRESH=(\d+)", result.stdout)
    assert qid, result.stdout
    assert int(qid.group(2)) > 20  # the refresh token was captured too


def test_the_readme_walkthrough_and_fault_directives_paste_and_run(stack: Stack) -> None:
    text = README.read_text()
    walk = _bash_block(text, "## API walk-through")
    faults = _bash_block(text, "### Testing your error handling against the simulator")
    assert "API=http://127.0.0.1:8000\n" in walk
    script = walk.replace("API=http://127.0.0.1:8000\n", f"API={stack.api_url}\n") + faults
    result = _paste(script + '\necho "QID=$QID SLOW=$SLOW BAD=$BAD"')
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    ids = re.search(r"QID=([0-9a-f-]{36}) SLOW=([0-9a-f-]{36}) BAD=([0-9a-f-]{36})", result.stdout)
    assert ids, out
    assert "HTTP/1.1 202" in result.stderr
    assert '"status":"completed"' in result.stderr  # the poll loop's last line
    assert '"code":"query_not_cancellable"' in result.stdout  # cancelling the finished query
    # Asked with `Prefer: wait`: answered in the submit's own response.
    assert '"status":"completed","query":"Name one queueing discipline"' in result.stdout, out
    # The slow one: running by then (cancel requested, 202), or still pending on a busy machine (cancelled, 200).
    assert re.search(r'"status":"cancelled"|"status":"running".*"cancel_requested":true', result.stdout), out
    # A password change and back (no output), logout-all (204), its token refused (401), a new login's logout (204).
    assert "\n204\n401\n204\n" in result.stdout
    # The simulator's fault directive: two 500s, then an answer on the third attempt.
    assert re.search(r'"status":"completed".*"attempts":3', result.stdout), out
