"""Region statistics of a partition: pure functions on padded polygons."""

from __future__ import annotations

import torch

from splinecam_lightning import geometry

__all__ = ["region_eccentricity", "region_vertex_distance_ratio", "partition_stats", "STAT_KEYS"]

#: Keys of :func:`partition_stats`, in a stable order.
STAT_KEYS = (
    "num_regions",
    "mean_area",
    "std_area",
    "min_area",
    "max_area",
    "region_density",
    "mean_vertices",
    "mean_eccentricity",
    "mean_eccentricity_paper",
    "boundary_length",
    "boundary_regions",
    "mean_slope_norm",
    "decision_pieces",
)


def region_eccentricity(vertices: torch.Tensor) -> torch.Tensor:
    """Ratio of principal axes of each region: ``sqrt(l1 / l2)`` of its area second-moment matrix (``>= 1``).

    ``l1 >= l2`` are the eigenvalues of the covariance of a uniform distribution on the polygon, so a disc or
    square gives 1, and a ``w x h`` rectangle ``max(w, h) / min(w, h)``. Unlike vertex-distance ratios it does
    not jump when a region gains a very short edge.
    """
    ixx, iyy, ixy = geometry.polygon_covariances(vertices)
    tr = ixx + iyy
    det = ixx * iyy - ixy * ixy
    disc = torch.sqrt(torch.clamp(tr * tr / 4 - det, min=0))
    l1 = tr / 2 + disc
    l2 = torch.clamp(tr / 2 - disc, min=0)
    return torch.sqrt(l1 / torch.clamp(l2, min=torch.finfo(l1.dtype).tiny))


def region_vertex_distance_ratio(vertices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """SplineCam's eccentricity: largest over smallest distance between two distinct vertices of a region."""
    K = vertices.shape[1]
    d = torch.cdist(vertices, vertices)  # (R, K, K)
    ar = torch.arange(K, device=vertices.device)
    valid = ar[None, :] < counts[:, None]
    pair = valid[:, :, None] & valid[:, None, :] & (ar[:, None] != ar[None, :])[None]
    dmax = torch.where(pair, d, torch.zeros_like(d)).flatten(1).amax(1)
    dmin = torch.where(pair, d, torch.full_like(d, torch.inf)).flatten(1).amin(1)
    return dmax / torch.clamp(dmin, min=torch.finfo(d.dtype).tiny)


def partition_stats(partition, pieces: bool = True) -> dict[str, float]:
    """Statistics of a :class:`~splinecam_lightning.Partition`.

    Definitions (areas in plane units of the slice):

    - ``num_regions``: number of linear regions in the domain.
    - ``mean_area``, ``std_area`` (population), ``min_area``, ``max_area``: of region areas.
    - ``region_density``: regions per unit area, ``num_regions / domain area``.
    - ``mean_vertices``: mean number of polygon vertices per region.
    - ``mean_eccentricity``: mean over regions of :func:`region_eccentricity` (principal-axis ratio, ``>= 1``).
    - ``mean_eccentricity_paper``: mean over regions of :func:`region_vertex_distance_ratio`, the SplineCam
      paper's definition (max over min pairwise vertex distance), for comparison with its figures.
    - ``boundary_length``: total length of the decision boundary (zero level set for one output).
    - ``boundary_regions``: number of regions the decision boundary passes through.
    - ``mean_slope_norm``: mean over regions of the Frobenius norm of the region's Jacobian with respect to
      plane coordinates.
    - ``decision_pieces``: total number of connected pieces of all classes' decision regions in the slice, and
      ``pieces_class_<c>`` the number for class ``c`` (classes present in the slice; for one output, class 1 is
      ``output > 0``). See :func:`splinecam_lightning.graph.class_pieces`. Skipped when ``pieces=False``.
    """
    areas = partition.areas
    n = partition.num_regions
    seg = partition.boundary
    blen = (seg[:, 1] - seg[:, 0]).norm(dim=1).sum() if seg.numel() else torch.zeros((), dtype=torch.float64)
    out = {
        "num_regions": float(n),
        "mean_area": float(areas.mean()),
        "std_area": float(areas.std(unbiased=False)) if n > 1 else 0.0,
        "min_area": float(areas.min()),
        "max_area": float(areas.max()),
        "region_density": float(n / partition.slice.area),
        "mean_vertices": float(partition.counts.double().mean()),
        "mean_eccentricity": float(region_eccentricity(partition.vertices).mean()),
        "mean_eccentricity_paper": float(region_vertex_distance_ratio(partition.vertices, partition.counts).mean()),
        "boundary_length": float(blen),
        "boundary_regions": float(torch.unique(partition.boundary_regions).numel()),
        "mean_slope_norm": float(partition.slope_norms.mean()),
    }
    if pieces:
        from splinecam_lightning.graph import class_pieces

        per_class = class_pieces(partition)
        out["decision_pieces"] = float(sum(per_class.values()))
        out.update({f"pieces_class_{c}": float(k) for c, k in sorted(per_class.items())})
    return out
