"""schemathesis against the live /openapi.json of a real `stepnet serve`: seeded, a bounded number
of cases per operation, every check but positive_data_acceptance (the schema cannot say that a
binary body must be a decodable image). Zero 5xx, zero responses that differ from the schema.

`make test` runs FUZZ_EXAMPLES=100 cases per operation (under a minute); `make fuzz` keeps
fuzzing, stateful phase included, until FUZZ_MAX_TIME_S is spent (schemathesis's --max-time
repeats the fuzzing phases until then). FUZZ_SEED picks the cases.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
MAX_TIME_S = int(os.environ.get("FUZZ_MAX_TIME_S", "0"))      # 0: no time budget, EXAMPLES bound it
SEED = os.environ.get("FUZZ_SEED", "20261202")
PHASES = os.environ.get("FUZZ_PHASES", "examples,coverage,fuzzing")

pytestmark = pytest.mark.timeout((MAX_TIME_S or 300) + 120)


@pytest.fixture(scope="module")
def fuzzed(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, access_log="false")


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(fuzzed, tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(schemathesis), "run", fuzzed.url + "/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", str(EXAMPLES), "--seed", SEED, "--phases", PHASES, "--workers", "1",
         *(["--max-time", str(MAX_TIME_S)] if MAX_TIME_S else []),
         "--generation-database", "none", "--request-timeout", "20", "--no-color"],
        capture_output=True, text=True, timeout=(MAX_TIME_S or 300) + 60, cwd=tmp_path)
    summary = result.stdout[-6000:]
    print(summary[summary.rfind("SUMMARY") - 40:])        # shown by `make fuzz` (pytest -s)
    assert result.returncode == 0, summary
    assert "Test cases:" in summary and "failure" not in summary.split("SUMMARY")[-1], summary
    assert fuzzed.proc.poll() is None
