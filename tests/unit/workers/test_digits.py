"""The digits task reads scikit-learn's data file without importing scikit-learn."""

import subprocess
import sys

import numpy as np
from sklearn.datasets import load_digits

from workers.tasks.digits import read_digits


def test_read_digits_equals_scikit_learns_loader() -> None:
    images, target = read_digits()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


def test_a_worker_reading_the_digits_does_not_import_scikit_learn() -> None:
    code = ("import sys; from workers.tasks.digits import load_digits_split; load_digits_split(0.2); "
            "assert 'sklearn' not in sys.modules, sorted(m for m in sys.modules if m.startswith('sklearn'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
