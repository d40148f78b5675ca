"""timm's own model tests must be part of every run (``tests/timm_upstream``), not silently missing."""
from pathlib import Path

import timm

HERE = Path(__file__).resolve().parent / 'timm_upstream'


def test_timm_model_tests_are_present_for_the_installed_timm():
    hint = 'run `python tests/timm_upstream/fetch.py` (as .ci/run does) to fetch them from timm\'s sdist'
    assert (HERE / 'test_models.py').is_file(), f'timm\'s tests/test_models.py is missing: {hint}'
    stamp = HERE / 'TIMM_VERSION'
    assert stamp.is_file() and stamp.read_text().strip() == timm.__version__, \
        f'tests/timm_upstream/test_models.py is not from the installed timm {timm.__version__}: {hint}'
