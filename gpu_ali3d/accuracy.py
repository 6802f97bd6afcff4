"""Pose accuracy against a known truth, with the gauge a refinement cannot fix removed.

A refinement that rebuilds its reference from the data finds the poses only up to one global rotation of the
whole map (its frame is set by the average of the starting errors). :func:`pose_errors` removes the best global
rotation, fitted on either side of the poses, before measuring angles; shifts are plain differences.
"""
from __future__ import annotations

import numpy as np

from .geometry import rotation_matrix, shift_distance


def gauge_free_angle_errors(poses: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angular error per particle (degrees) after removing the mean relative rotation (either side).

    poses, truth : (n, 5) in gpu-ali3d's convention (only the angles are used).
    """
    from scipy.spatial.transform import Rotation

    r, t = (Rotation.from_matrix(np.transpose(rotation_matrix(*np.asarray(p)[:, :3].T), (0, 2, 1)))
            for p in (poses, truth))
    g_left, g_right = (r * t.inv()).mean(), (t.inv() * r).mean()      # r = g t  or  r = t g
    left = np.rad2deg((t.inv() * (g_left.inv() * r)).magnitude())
    right = np.rad2deg((t.inv() * (r * g_right.inv())).magnitude())
    return left if np.median(left) < np.median(right) else right


def pose_errors(poses: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Median angular error (degrees, gauge removed) and median shift error (pixels) of poses against truth."""
    return {"angle_deg": float(np.median(gauge_free_angle_errors(poses, truth))),
            "shift_px": float(np.median(shift_distance(poses, truth)))}
