"""quat_from_matrix gives the same bytes as scipy's Rotation.from_matrix(m).as_quat(), on every branch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from lerobot_ript.envs.rotation import _quat_from_entries, quat_from_matrix


def _scipy(matrix: np.ndarray) -> np.ndarray:
    return Rotation.from_matrix(matrix).as_quat()


def _assert_same_bits(matrices: np.ndarray) -> None:
    """Equal bytes (so also the sign of zeros), one matrix at a time as MetaWorld calls it."""
    for matrix in matrices:
        expected, got = _scipy(matrix), quat_from_matrix(matrix)
        assert got.dtype == expected.dtype and got.shape == expected.shape == (4,)
        assert got.tobytes() == expected.tobytes(), (matrix, expected, got)


def _branch(matrix: np.ndarray) -> int:
    """scipy's choice: argmax of (m00, m11, m22, trace), the first on ties."""
    return int(np.argmax([matrix[0, 0], matrix[1, 1], matrix[2, 2], np.trace(matrix)]))


def _takes_fast_path(matrix: np.ndarray) -> bool:
    return _quat_from_entries(*matrix.ravel().tolist()) is not None


def test_random_rotations_equal_scipy_bit_for_bit():
    matrices = Rotation.random(5_000, rng=np.random.default_rng(0)).as_matrix()
    _assert_same_bits(matrices)
    assert all(_takes_fast_path(m) for m in matrices[:200])


def test_near_180_degree_rotations_cover_every_branch():
    rng = np.random.default_rng(1)
    axes = rng.normal(size=(3_000, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.pi - 10.0 ** rng.uniform(-12, -1, size=(3_000, 1))
    angles[::3] = np.pi  # exactly 180 degrees
    matrices = Rotation.from_rotvec(axes * angles).as_matrix()
    _assert_same_bits(matrices)
    branches = {_branch(m) for m in matrices}
    assert branches == {0, 1, 2}, branches  # near 180 degrees the trace (about -1) never wins


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_each_branch_on_random_rotations(branch):
    matrices = Rotation.random(10_000, rng=np.random.default_rng(2 + branch)).as_matrix()
    picked = [m for m in matrices if _branch(m) == branch][:1_000]
    assert len(picked) >= 100
    _assert_same_bits(np.asarray(picked))


def test_ties_and_exact_matrices():
    half = np.sqrt(0.5)
    matrices = [
        np.eye(3),
        np.diag([1.0, -1.0, -1.0]),  # 180 degrees about x: branch 0
        np.diag([-1.0, 1.0, -1.0]),  # about y: branch 1
        np.diag([-1.0, -1.0, 1.0]),  # about z: branch 2
        np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),  # m00 == m11: first wins
        np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]),  # m00 == m22
        np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),  # m11 == m22
        np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # m22 == trace == 1
        np.array([[1.0, 0.0, 0.0], [0.0, half, -half], [0.0, half, half]]),  # m00 == trace
        np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # all diagonal entries 0
    ]
    _assert_same_bits(np.asarray(matrices))


def test_flat_xmat_and_other_dtypes_are_read_like_scipy_reads_the_3x3():
    matrix = Rotation.random(rng=np.random.default_rng(3)).as_matrix()
    assert quat_from_matrix(matrix.ravel()).tobytes() == _scipy(matrix).tobytes()
    assert (
        quat_from_matrix(matrix.astype(np.float32)).tobytes() == _scipy(matrix.astype(np.float32)).tobytes()
    )
    assert quat_from_matrix(np.eye(3, dtype=int)).tobytes() == _scipy(np.eye(3, dtype=int)).tobytes()


def test_matrices_outside_the_fast_path_are_left_to_scipy():
    rng = np.random.default_rng(4)
    base = Rotation.random(50, rng=rng).as_matrix()
    nearly = base + rng.normal(scale=1e-9, size=base.shape)  # not orthogonal to 1e-12: scipy's SVD branch
    scaled = base * 1.5
    for matrix in [*nearly, *scaled]:
        assert not _takes_fast_path(matrix)
    _assert_same_bits(np.concatenate([nearly, scaled]))
    for bad in (-np.eye(3), np.zeros((3, 3)), np.full((3, 3), np.nan)):
        assert not _takes_fast_path(bad)
        with pytest.raises(ValueError) as expected, np.errstate(invalid="ignore"):
            _scipy(bad)  # non-positive determinant; NaN: SVD did not converge
        with pytest.raises(ValueError) as got, np.errstate(invalid="ignore"):
            quat_from_matrix(bad)
        assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)


def test_matrices_from_metaworld_states_equal_scipy():
    pytest.importorskip("metaworld")
    from lerobot_ript.envs.metaworld import _build_metaworld_env

    env = _build_metaworld_env("pick-place-v3")
    rng = np.random.default_rng(5)
    matrices = []
    try:
        for seed in range(3):
            env.seed(seed)
            env.reset()
            for _ in range(40):  # random actions tumble the object once the gripper hits it
                env.step(rng.uniform(-1, 1, 4).astype(np.float32))
                for source in (env.data.geom_xmat, env.data.xmat, env.data.site_xmat):
                    matrices.extend(source.reshape(-1, 3, 3))
    finally:
        env.close()
    matrices = np.asarray(matrices)
    assert all(_takes_fast_path(m) for m in matrices)
    _assert_same_bits(matrices)
