"""The contract against the real buf: `buf lint` (STANDARD and COMMENTS, buf.yaml) and `buf breaking` against the
last release's image, which does catch a change that breaks clients. Fast: no engine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import ROOT, buf

RELEASE = ROOT / "proto" / "releases" / "v1.binpb"
PROTO = Path("proto") / "superweights" / "v1" / "superweights.proto"


def run_buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([buf(), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_lint_uses_the_standard_rules_with_no_exceptions():
    lint = yaml.safe_load((ROOT / "buf.yaml").read_text())["lint"]
    assert "STANDARD" in lint["use"] and not lint.get("except") and not lint.get("ignore")


def test_contract_passes_buf_lint():
    done = run_buf("lint")
    assert done.returncode == 0, f"buf lint:\n{done.stdout}{done.stderr}"


def test_contract_keeps_the_last_release_working():
    done = run_buf("breaking", "--against", str(RELEASE))
    assert done.returncode == 0, (
        f"this change breaks clients of the released contract ({RELEASE.relative_to(ROOT)}):\n"
        f"{done.stdout}{done.stderr}\nAdd fields and messages instead; a break needs a new package "
        "(proto/releases/README.md)")


@pytest.mark.parametrize(("old", "new", "reported"), [
    ("  string variant = 4;\n", "", 'field "4" with name "variant" on message "GenerateRequest" was deleted'),
    ("  int32 max_tokens = 1;", "  int64 max_tokens = 1;", 'changed type from "int32" to "int64"'),
    ("CompareGenerationsResponse", "CompareResponse", 'message "CompareGenerationsResponse" was deleted'),
], ids=["deleted-field", "changed-type", "renamed-message"])
def test_buf_breaking_catches_a_change_that_breaks_clients(tmp_path, old, new, reported):
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    shutil.copytree(ROOT / PROTO.parent, tmp_path / PROTO.parent)
    source = (tmp_path / PROTO).read_text()
    assert old in source
    (tmp_path / PROTO).write_text(source.replace(old, new))
    done = run_buf("breaking", "--against", str(RELEASE), cwd=tmp_path)
    assert done.returncode != 0 and reported in done.stdout, done.stdout + done.stderr
