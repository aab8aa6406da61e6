"""Every input normlab refuses: one line naming the problem and the fix, exit 2, nothing written.
The cases are tests/bad_inputs.py, which docs/bad-input.md is written from."""
import re
import subprocess
from pathlib import Path

import pytest

from bad_inputs import CASES, Case, Elsewhere, run
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", [c for c in CASES if isinstance(c, Case)], ids=lambda c: c.id)
def test_refused_in_one_line_with_exit_2_and_nothing_written(case, tmp_path):
    code, stderr, created = run(case, tmp_path)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert case.expect in lines[0]
    assert created == []


def test_every_case_elsewhere_names_a_test_that_exists():
    for case in (c for c in CASES if isinstance(c, Elsewhere)):
        path, name = case.test.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), case.test


def test_the_catalogue_is_documented_and_large():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    doc = (ROOT / "docs" / "bad-input.md").read_text()
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M)
    assert sorted(documented) == sorted(ids), "run: python scripts/bad_input_catalogue.py > docs/bad-input.md"


def test_a_read_only_results_directory_is_reported_elsewhere(tmp_path, capsys, cifar_fixture):
    results = tmp_path / "results"
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")
    train(cfg, results / cfg.run_id(), RuntimeOptions(data_dir=str(cifar_fixture), progress=False))
    before = sorted(p.name for p in results.iterdir())
    subprocess.run(["chattr", "+i", str(results)], capture_output=True)
    try:
        if (results / "probe").exists() or _writable(results):
            pytest.skip("cannot make a directory read-only here (chattr +i refused, running as root)")
        code = main(["report", str(results)])
        err = capsys.readouterr().err
        assert code == 2 and "cannot write the report into" in err and "--out DIR" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        subprocess.run(["chattr", "-i", str(results)], capture_output=True)
    assert sorted(p.name for p in results.iterdir()) == before
    assert main(["report", str(results), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.md").exists() and (tmp_path / "elsewhere" / "results.csv").exists()


def _writable(directory: Path) -> bool:
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True
