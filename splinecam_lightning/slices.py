"""2D slices of a network's input space: a plane plus a convex polygon domain on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from splinecam_lightning.geometry import polygon_areas

__all__ = ["Slice"]

# Relative tolerances for rejecting degenerate input (scale-free: relative to the point spread).
_COLLINEAR_RTOL = 1e-9
_COPLANAR_RTOL = 1e-7
# Boxes: the shorter side relative to the longer one, and to the coordinates' magnitude (float64 resolution).
_THIN_RTOL = 1e-9
_RESOLUTION_RTOL = 1e-12
# Radii for which Slice.around's square passes every check of Slice's constructor by construction.
_SAFE_RADIUS = (1e-100, 1e100)


def _as_points(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


@dataclass
class Slice:
    """A plane through input space, ``x = origin + u * basis[0] + v * basis[1]``, and a convex domain on it.

    Points are flat: a model that takes ``(C, H, W)`` inputs is sliced in the flattened ``C*H*W`` space and
    :func:`~splinecam_lightning.compute_partition` reshapes them with ``input_shape``.

    Attributes:
        origin: ``(D,)`` input-space point at plane coordinates ``(0, 0)``.
        basis: ``(2, D)`` orthonormal rows spanning the plane (identity for 2D inputs).
        domain: ``(k, 2)`` convex polygon in plane coordinates, counter-clockwise, no repeated vertex.
        anchors: ``(m, 2)`` plane coordinates of the data points the slice was built from (may be empty).
        name: Short label used for folders and log keys.
    """

    origin: torch.Tensor
    basis: torch.Tensor
    domain: torch.Tensor
    anchors: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))
    name: str = "slice"

    def __post_init__(self) -> None:
        self.origin = _as_points(self.origin, "origin").reshape(-1)
        self.basis = _as_points(self.basis, "basis").reshape(2, -1)
        self.domain = _as_points(self.domain, "domain").reshape(-1, 2)
        self.anchors = _as_points(self.anchors, "anchors").reshape(-1, 2)
        if self.basis.shape[1] != self.origin.shape[0]:
            raise ValueError(f"basis has dimension {self.basis.shape[1]} but origin has {self.origin.shape[0]}")
        gram = self.basis @ self.basis.T
        if not torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-9):
            raise ValueError("basis rows must be orthonormal")
        self.domain = _convex_domain(self.domain)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_vertices(cls, vertices: Any, name: str = "slice") -> Slice:
        """Slice whose plane and domain are given by coplanar vertices.

        Args:
            vertices: ``(k >= 3, D)`` points. A closed polygon may repeat its first vertex at the end.
                The domain is the convex hull of the points. For ``D == 2`` the plane coordinates equal the
                input coordinates (origin zero, identity basis).
            name: Label of the slice.

        Raises:
            ValueError: NaN/Inf, fewer than three distinct points, repeated points, collinear points,
                points that are not coplanar, or a zero-area domain.
        """
        V = _as_points(vertices, "vertices")
        if V.ndim != 2 or V.shape[0] < 3 or V.shape[1] < 2:
            raise ValueError(f"vertices must have shape (k>=3, D>=2), got {tuple(V.shape)}")
        if V.shape[0] > 3 and torch.equal(V[0], V[-1]):
            V = V[:-1]
        _check_distinct(V)
        D = V.shape[1]
        if D == 2:
            origin = torch.zeros(2, dtype=torch.float64)
            basis = torch.eye(2, dtype=torch.float64)
        else:
            origin = V[0].clone()
            basis = _plane_basis(V - origin)
            resid = (V - origin) - ((V - origin) @ basis.T) @ basis
            spread = (V - origin).norm(dim=1).max()
            if resid.norm(dim=1).max() > _COPLANAR_RTOL * spread:
                raise ValueError(
                    "vertices are not coplanar: largest distance from their plane is "
                    f"{resid.norm(dim=1).max().item():.3g} (spread {spread.item():.3g})"
                )
        uv = (V - origin) @ basis.T
        return cls(origin=origin, basis=basis, domain=uv, name=name)

    @classmethod
    def box(cls, xmin: float, xmax: float, ymin: float, ymax: float, name: str = "box") -> Slice:
        """The axis-aligned rectangle ``[xmin, xmax] x [ymin, ymax]`` of a 2D input space (identity plane).

        Raises:
            ValueError: A bound that is not a finite number, ``xmin >= xmax`` or ``ymin >= ymax``, or a box too
                thin to compute on: a side under ``1e-9`` of the other side, or under ``1e-12`` of the size of its
                coordinates (beyond float64 resolution).
        """
        vals = []
        for label, v in (("xmin", xmin), ("xmax", xmax), ("ymin", ymin), ("ymax", ymax)):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"box {label} must be a number, got {v!r}") from None
            if not np.isfinite(f):
                raise ValueError(f"box {label} must be finite, got {f}")
            vals.append(f)
        x0, x1, y0, y1 = vals
        if not x1 > x0:
            raise ValueError(f"box needs xmin < xmax, got xmin={x0:g}, xmax={x1:g}")
        if not y1 > y0:
            raise ValueError(f"box needs ymin < ymax, got ymin={y0:g}, ymax={y1:g}")
        w, h = x1 - x0, y1 - y0
        if min(w, h) < _THIN_RTOL * max(w, h):
            raise ValueError(
                f"box is too thin: {w:.3g} wide and {h:.3g} high (a side must be at least {_THIN_RTOL:g} of the other)"
            )
        mag = max(abs(x0), abs(x1), abs(y0), abs(y1))
        if min(w, h) < _RESOLUTION_RTOL * mag:
            raise ValueError(
                f"box is too small for its position: {w:.3g} x {h:.3g} at coordinates of size {mag:.3g} is below "
                "float64 resolution; shift the model's inputs or use a larger box"
            )
        dom = torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float64)
        return cls(
            origin=torch.zeros(2, dtype=torch.float64), basis=torch.eye(2, dtype=torch.float64), domain=dom, name=name
        )

    @classmethod
    def square(cls, center: Any, half_width: float, name: str = "square") -> Slice:
        """The axis-aligned square of half-width ``half_width`` around ``center`` in a 2D input space.

        For a square around a point of a higher-dimensional input, use :meth:`around`.

        Raises:
            ValueError: ``center`` is not two finite numbers, ``half_width`` is not positive and finite, or the
                square is below float64 resolution at its position (see :meth:`box`).
        """
        c = _as_points(center, "square center").reshape(-1)
        if c.numel() != 2:
            raise ValueError(
                f"square center must have 2 coordinates, got {c.numel()}; use Slice.around for higher dimensions"
            )
        try:
            r = float(half_width)
        except (TypeError, ValueError):
            raise ValueError(f"square half-width must be a number, got {half_width!r}") from None
        if not (r > 0 and np.isfinite(r)):
            raise ValueError(f"square half-width must be a positive finite number, got {half_width}")
        cx, cy = (float(v) for v in c)
        return cls.box(cx - r, cx + r, cy - r, cy + r, name=name)

    @classmethod
    def through_points(cls, a: Any, b: Any, c: Any, margin: float = 0.2, name: str = "slice") -> Slice:
        """The plane through three data points with a rectangle holding them plus a margin.

        The plane's origin is the points' centroid and its first axis runs from ``a`` to ``b``. The domain is
        the bounding box of the three points in plane coordinates, grown on every side by ``margin`` times
        its larger side. The three points are kept as ``anchors``.

        Raises:
            ValueError: NaN/Inf, repeated or collinear points, or a negative margin.
        """
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        P = torch.stack([_as_points(p, "point").reshape(-1) for p in (a, b, c)])
        _check_distinct(P)
        origin = P.mean(0)
        basis = _plane_basis(P - origin, first=P[1] - P[0])
        uv = (P - origin) @ basis.T
        lo, hi = uv.min(0).values, uv.max(0).values
        pad = margin * (hi - lo).max()
        lo, hi = lo - pad, hi + pad
        dom = torch.stack([lo, torch.stack([hi[0], lo[1]]), hi, torch.stack([lo[0], hi[1]])])
        return cls(origin=origin, basis=basis, domain=dom, anchors=uv, name=name)

    @classmethod
    def around(cls, x: Any, radius: float, generator: torch.Generator | None = None, name: str = "slice") -> Slice:
        """A randomly oriented square of half-width ``radius`` centred on ``x`` (plane coords ``[-r, r]^2``).

        The orientation is drawn from ``generator`` (a CPU ``torch.Generator``), never the global RNG when one
        is given. ``x`` is kept as the single anchor at ``(0, 0)``.
        """
        if not (radius > 0 and np.isfinite(radius)):
            raise ValueError(f"radius must be a positive finite number, got {radius}")
        origin = _as_points(x, "x").reshape(-1)
        D = origin.shape[0]
        if D < 2:
            raise ValueError("Slice.around needs an input of at least 2 dimensions")
        g = torch.randn(D, 2, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        basis = q.T.contiguous()
        r = float(radius)
        dom = torch.tensor([[-r, -r], [r, -r], [r, r], [-r, r]], dtype=torch.float64)
        anchors = torch.zeros(1, 2, dtype=torch.float64)
        if not _SAFE_RADIUS[0] <= r <= _SAFE_RADIUS[1]:
            return cls(origin=origin, basis=basis, domain=dom, anchors=anchors, name=name)
        # Valid by construction: finite origin (checked above), orthonormal QR basis, and a counter-clockwise
        # square that the convex hull returns unchanged; skipping the checks (mostly the hull) makes building
        # many squares (local complexity) ~10x cheaper. Extreme radii take the checked path.
        out = cls.__new__(cls)
        out.origin, out.basis, out.domain, out.anchors, out.name = origin, basis, dom, anchors, name
        return out

    # ------------------------------------------------------------------ mapping
    @property
    def input_dim(self) -> int:
        """Dimension ``D`` of the (flattened) input space."""
        return int(self.origin.shape[0])

    @property
    def area(self) -> float:
        """Area of the domain polygon in plane units."""
        return float(polygon_areas(self.domain[None])[0])

    def to_input(self, uv: torch.Tensor) -> torch.Tensor:
        """Map ``(m, 2)`` plane coordinates to ``(m, D)`` flat input points (dtype/device of ``uv``)."""
        uv = torch.as_tensor(uv)
        dt = uv.dtype if uv.is_floating_point() else torch.float64
        o = self.origin.to(uv.device, dt)
        B = self.basis.to(uv.device, dt)
        return o + uv.to(dt) @ B

    def to_plane(self, x: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of ``(m, D)`` flat input points onto plane coordinates ``(m, 2)``."""
        x = torch.as_tensor(x)
        dt = x.dtype if x.is_floating_point() else torch.float64
        x = x.reshape(x.shape[0], -1).to(dt)
        return (x - self.origin.to(x.device, dt)) @ self.basis.to(x.device, dt).T

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and strings, suitable for checkpoints."""
        return {
            "origin": self.origin.clone(),
            "basis": self.basis.clone(),
            "domain": self.domain.clone(),
            "anchors": self.anchors.clone(),
            "name": self.name,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Slice:
        """Inverse of :meth:`state_dict`."""
        return cls(**state)


def _check_distinct(V: torch.Tensor) -> None:
    scale = (V - V.mean(0)).norm(dim=1).max()
    if scale == 0:
        raise ValueError("slice points are all the same point")
    d = torch.cdist(V, V)
    d.fill_diagonal_(float("inf"))
    if (d <= 1e-12 * scale).any():
        i, j = [int(k) for k in torch.nonzero(d <= 1e-12 * scale)[0]]
        raise ValueError(f"slice points {i} and {j} are repeated (the same point)")


def _plane_basis(P: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal (2, D) basis of the span of the centred points, first axis along ``first`` if given."""
    norms = P.norm(dim=1)
    scale = norms.max()
    e1 = first if first is not None else P[int(norms.argmax())]
    e1 = e1 / e1.norm()
    rest = P - (P @ e1)[:, None] * e1
    rn = rest.norm(dim=1)
    if rn.max() <= _COLLINEAR_RTOL * scale:
        raise ValueError("slice points are collinear: they span a line, not a plane")
    e2 = rest[int(rn.argmax())]
    e2 = e2 - (e2 @ e1) * e1
    e2 = e2 / e2.norm()
    return torch.stack([e1, e2])


def _convex_domain(uv: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise convex hull of plane points, with errors for degenerate input."""
    if uv.shape[0] < 3:
        raise ValueError(f"a domain needs at least 3 vertices, got {uv.shape[0]}")
    pts = uv.numpy()
    span = np.ptp(pts, axis=0).max()
    if span == 0:
        raise ValueError("the domain is empty: all its vertices are the same point")
    centred = (pts - pts.mean(0)) / span
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[1] <= _COLLINEAR_RTOL * sv[0]:
        raise ValueError("the domain has zero area: its vertices are collinear")
    from scipy.spatial import ConvexHull, QhullError  # here: importing it costs every process ~0.3 s

    try:
        hull = ConvexHull(pts)
    except QhullError as e:  # pragma: no cover - guarded by the SVD test above
        raise ValueError(f"the domain has zero area: {e}") from None
    poly = torch.as_tensor(pts[hull.vertices], dtype=torch.float64)  # 2D hulls are counter-clockwise
    area = polygon_areas(poly[None])[0]
    if area <= 1e-14 * span * span:
        raise ValueError("the domain has zero area")
    return poly
