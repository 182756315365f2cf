"""The result of an exact partition: regions, their affine maps, and the decision boundary."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinecam_lightning import geometry
from splinecam_lightning._files import atomic_path
from splinecam_lightning.slices import Slice

__all__ = ["Partition", "ARCHIVE_VERSION"]

#: Format version written by :meth:`Partition.save`; :meth:`Partition.load` refuses newer files.
ARCHIVE_VERSION = 1


def _write_npz(f: Any, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` at zlib level 1 instead of 6: on a 100k-region digits-CNN partition 1.0-1.2 s
    against 1.5-1.7 s, for a file 7 % larger (the snapshot worker writes one per slice and snapshot)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(a), allow_pickle=False)


@dataclass
class Partition:
    """Exact linear-region partition of a 2D slice. All tensors are float64/int64 on the CPU.

    Region ``r`` is the convex polygon ``vertices[r, :counts[r]]`` (counter-clockwise, plane coordinates).
    Padded slots repeat vertex 0, so cyclic formulas (shoelace, edge loops) work on the padded rows.
    On region ``r`` the network output is ``y(uv) = jacobians[r] @ uv + offsets[r]`` exactly.

    Attributes:
        slice: The slice that was partitioned.
        vertices: ``(R, K, 2)`` padded region vertices.
        counts: ``(R,)`` number of vertices of each region.
        jacobians: ``(R, O, 2)`` derivative of the ``O`` outputs with respect to plane coordinates ``(u, v)``.
        offsets: ``(R, O)`` output of the region's affine map at ``uv = (0, 0)``.
        codes: Activation code per nonlinear node, ``name -> (R, F) int8``, in network order. ``name`` is the
            module's path (``path:i`` for the ``i``-th call of a module called several times, from 0) or, for
            functions and methods, the traced node's name. ReLU-like units store 1 where the
            unit's input is positive; Hardtanh/clamp store 0/1/2 for below/inside/above; max pooling and maxout
            store the argmax position inside each window. Empty when computed with ``codes=False``.
        boundary: ``(E, 2, 2)`` decision-boundary segments in plane coordinates. For one output it is the zero
            level set; for several outputs the boundary between argmax classes.
        boundary_regions: ``(E,)`` region index of each boundary segment.
        boundary_classes: ``(E, 2)`` the two classes a segment separates (``(0, 1)`` for a single output,
            where class 1 means a positive output).
    """

    slice: Slice
    vertices: torch.Tensor
    counts: torch.Tensor
    jacobians: torch.Tensor
    offsets: torch.Tensor
    codes: dict[str, torch.Tensor] = field(default_factory=dict)
    boundary: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, 2, dtype=torch.float64))
    boundary_regions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    boundary_classes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))
    seconds: float = 0.0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ basic views
    @property
    def num_regions(self) -> int:
        """Number of linear regions in the domain."""
        return int(self.counts.shape[0])

    @property
    def output_dim(self) -> int:
        """Number of network outputs ``O``."""
        return int(self.offsets.shape[1])

    @property
    def regions(self) -> list[torch.Tensor]:
        """List of ``(k_i, 2)`` vertex tensors, counter-clockwise, in plane coordinates."""
        if "regions" not in self._cache:
            R, K = self.vertices.shape[:2]
            mask = geometry.vertex_mask(self.counts, K)
            flat = self.vertices[mask]
            self._cache["regions"] = list(torch.split(flat, self.counts.tolist()))
        return self._cache["regions"]

    @property
    def areas(self) -> torch.Tensor:
        """``(R,)`` region areas (shoelace formula), in plane units."""
        if "areas" not in self._cache:
            self._cache["areas"] = geometry.polygon_areas(self.vertices)
        return self._cache["areas"]

    @property
    def centroids(self) -> torch.Tensor:
        """``(R, 2)`` area centroids of the regions."""
        if "centroids" not in self._cache:
            self._cache["centroids"] = geometry.polygon_centroids(self.vertices)
        return self._cache["centroids"]

    @property
    def affine_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(jacobians, offsets)``: on region ``r`` the output is ``jacobians[r] @ uv + offsets[r]``."""
        return self.jacobians, self.offsets

    @property
    def slope_norms(self) -> torch.Tensor:
        """``(R,)`` Frobenius norm of each region's Jacobian (the colour of the paper's videos)."""
        return self.jacobians.flatten(1).norm(dim=1)

    @property
    def predicted_class(self) -> torch.Tensor:
        """``(R,)`` class predicted at each region's centroid (``output > 0`` for a single output)."""
        y = self.evaluate(self.centroids)
        if self.output_dim == 1:
            return (y[:, 0] > 0).long()
        return y.argmax(1)

    def activation_pattern(self) -> torch.Tensor:
        """``(R, F_total)`` int8 concatenation of all nodes' codes, in network order."""
        if not self.codes:
            return torch.zeros(self.num_regions, 0, dtype=torch.int8)
        return torch.cat([c.reshape(self.num_regions, -1) for c in self.codes.values()], dim=1)

    def evaluate(self, uv: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Evaluate regions' affine maps at plane points.

        Args:
            uv: ``(m, 2)`` plane points.
            regions: ``(m,)`` region index for each point; defaults to ``arange(R)`` (one point per region).

        Returns:
            ``(m, O)`` outputs.
        """
        uv = torch.as_tensor(uv, dtype=torch.float64)
        idx = torch.arange(self.num_regions) if regions is None else torch.as_tensor(regions)
        return torch.einsum("mok,mk->mo", self.jacobians[idx], uv) + self.offsets[idx]

    def locate(self, uv: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the region containing each plane point (``-1`` outside the domain).

        Points on a shared edge get the lowest-index region that contains them.
        """
        uv = torch.as_tensor(uv, dtype=torch.float64)
        return geometry.locate_points(self.vertices, self.counts, uv, chunk=chunk)

    # ------------------------------------------------------------------ statistics
    def stats(self, pieces: bool = True) -> dict[str, float]:
        """Region statistics; see :func:`splinecam_lightning.stats.partition_stats` for definitions."""
        from splinecam_lightning.stats import partition_stats

        return partition_stats(self, pieces=pieces)

    def adjacency(self, as_edge_list: bool = False):
        """Region adjacency graph: a symmetric ``scipy.sparse.csr_matrix`` (or ``(E, 2)`` edge list) of regions
        sharing an edge of positive length."""
        from splinecam_lightning.graph import region_adjacency

        return region_adjacency(self, as_edge_list=as_edge_list)

    def to_graph_tool(self):
        """The adjacency graph as a ``graph_tool.Graph``; raises ImportError with install help without graph-tool."""
        from splinecam_lightning.graph import to_graph_tool

        return to_graph_tool(self)

    def class_pieces(self) -> dict[int, int]:
        """Connected pieces of each class's decision region in the slice (see :mod:`splinecam_lightning.graph`)."""
        from splinecam_lightning.graph import class_pieces

        return class_pieces(self)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, codes: bool = True, meta: dict[str, Any] | None = None) -> Path:
        """Write the partition to a compressed ``.npz`` file, atomically; :meth:`load` restores it exactly.

        Stored: the region vertices (flat, with counts), Jacobians and offsets, the decision boundary with its
        regions and classes, the slice, the activation codes (binary codes bit-packed), and two small per-region
        arrays for readers that must not load the geometry: ``slope_norms`` and ``areas`` (used to fit colour
        scales over a whole run), plus ``predicted_class``. Everything is float64/int64 as in memory, so the
        round trip is bit-exact.

        Args:
            path: Destination file (``.npz`` is not appended); parent folders are created.
            codes: Store the activation codes (``False`` makes files smaller; :meth:`activation_pattern` of the
                loaded partition is then empty).
            meta: Extra JSON-serialisable information kept with the file (e.g. ``{"step": 100}``), returned by
                :meth:`load_meta` and in ``loaded._cache["meta"]``.

        Returns:
            The written path.
        """
        path = Path(path)
        counts = self.counts.to(torch.long).cpu()
        R, K = int(self.vertices.shape[0]), int(self.vertices.shape[1])
        mask = geometry.vertex_mask(counts, K)
        arrays: dict[str, np.ndarray] = {
            "version": np.array(ARCHIVE_VERSION),
            "pad_width": np.array(K),
            "counts": counts.numpy(),
            "vertices": self.vertices.cpu()[mask].numpy(),
            "jacobians": self.jacobians.cpu().numpy(),
            "offsets": self.offsets.cpu().numpy(),
            "boundary": self.boundary.cpu().numpy(),
            "boundary_regions": self.boundary_regions.cpu().numpy(),
            "boundary_classes": self.boundary_classes.cpu().numpy(),
            "seconds": np.array(float(self.seconds)),
            "slope_norms": self.slope_norms.cpu().numpy(),
            "areas": self.areas.cpu().numpy(),
            "predicted_class": (self.predicted_class.cpu().numpy() if R else np.zeros(0, dtype=np.int64)),
            "slice_origin": self.slice.origin.numpy(),
            "slice_basis": self.slice.basis.numpy(),
            "slice_domain": self.slice.domain.numpy(),
            "slice_anchors": self.slice.anchors.numpy(),
        }
        header: dict[str, Any] = {"slice_name": self.slice.name, "codes": [], "meta": meta or {}}
        if codes:
            for i, (name, c) in enumerate(self.codes.items()):
                c = c.cpu()
                binary = bool(c.numel() == 0 or (int(c.min()) >= 0 and int(c.max()) <= 1))
                a = c.numpy().astype(np.uint8) if binary else c.numpy()
                arrays[f"code_{i}"] = np.packbits(a, axis=-1) if binary and a.ndim >= 1 else a
                dtype = str(c.dtype).replace("torch.", "")
                header["codes"].append({"name": name, "shape": list(c.shape), "dtype": dtype, "packed": binary})
        arrays["header"] = np.array(json.dumps(header))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                _write_npz(f, arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """Read a partition written by :meth:`save`.

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is not a partition archive, or was written by a newer version.
        """
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z.files or "version" not in z.files:
                raise ValueError(f"{path} is not a SplineCam partition archive (no header)")
            version = int(z["version"])
            if version > ARCHIVE_VERSION:
                raise ValueError(
                    f"{path} is a version {version} partition archive; this splinecam-lightning reads up to "
                    f"version {ARCHIVE_VERSION}"
                )
            header = json.loads(str(z["header"]))
            counts = torch.from_numpy(z["counts"].astype(np.int64))
            K = int(z["pad_width"])
            flat = torch.from_numpy(z["vertices"])
            R = int(counts.shape[0])
            vertices = torch.zeros(R, K, 2, dtype=flat.dtype)
            if R:
                mask = geometry.vertex_mask(counts, K)
                vertices[mask] = flat
                first = vertices[:, :1, :].expand(R, K, 2)
                vertices = torch.where(mask[..., None], vertices, first)
            codes: dict[str, torch.Tensor] = {}
            for i, info in enumerate(header.get("codes", [])):
                a = z[f"code_{i}"]
                shape = tuple(info["shape"])
                if info["packed"] and len(shape) >= 1:
                    a = np.unpackbits(a, axis=-1, count=shape[-1]) if shape[-1] else np.zeros(shape, np.uint8)
                codes[info["name"]] = torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, info["dtype"]))
            sl = Slice(
                origin=torch.from_numpy(z["slice_origin"]),
                basis=torch.from_numpy(z["slice_basis"]),
                domain=torch.from_numpy(z["slice_domain"]),
                anchors=torch.from_numpy(z["slice_anchors"]),
                name=header.get("slice_name", "slice"),
            )
            sl.domain = torch.from_numpy(z["slice_domain"])  # as stored: the hull may start at another vertex
            part = cls(
                slice=sl,
                vertices=vertices,
                counts=counts,
                jacobians=torch.from_numpy(z["jacobians"]),
                offsets=torch.from_numpy(z["offsets"]),
                codes=codes,
                boundary=torch.from_numpy(z["boundary"]),
                boundary_regions=torch.from_numpy(z["boundary_regions"].astype(np.int64)),
                boundary_classes=torch.from_numpy(z["boundary_classes"].astype(np.int64)),
                seconds=float(z["seconds"]),
            )
        part._cache["meta"] = header.get("meta", {})
        return part

    @staticmethod
    def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``meta`` dictionary stored by :meth:`save`, without reading the geometry."""
        with np.load(Path(path), allow_pickle=False) as z:
            return json.loads(str(z["header"])).get("meta", {})
