"""The grid graph's minimum cut (mincut.grid_min_cut, our Boykov-Kolmogorov max-flow): hand-computed cuts of
a few nodes; the graph of an organ on a CT (mincut.ct_graph) by hand; the same source side as SciPy's Dinic
plus a breadth-first search of its residual on random grids and on the graph of a real CT's liver; and a card with a cut refused in one line where Numba is
missing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage, sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from LiverSegLib.mincut import ct_graph, grid_min_cut, padded_min_cut
from LiverSegLib.postprocessing import cut_organ

from conftest import PROJECT_ROOT, read_case

DIRECTIONS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def scipy_source_side(capacity: np.ndarray, terminal: np.ndarray) -> np.ndarray:
    """The reference: the same graph as an explicit sparse matrix, SciPy's Dinic, and the nodes the source
    reaches in its residual graph."""
    shape = terminal.shape
    count = terminal.size
    index = np.arange(count).reshape(shape)
    tails, heads, capacities = [], [], []
    for direction, step in enumerate(DIRECTIONS):
        coordinates = np.indices(shape).reshape(3, -1).T
        neighbour = coordinates + step
        inside = np.all((neighbour >= 0) & (neighbour < shape), axis=1)
        tails.append(index.ravel()[inside])
        heads.append(index[tuple(neighbour[inside].T)])
        capacities.append(capacity[..., direction].ravel()[inside])
    source, sink = count, count + 1
    flat = terminal.ravel()
    tails += [np.full(count, source), np.arange(count)]
    heads += [np.arange(count), np.full(count, sink)]
    capacities += [np.maximum(flat, 0), np.maximum(-flat, 0)]
    capacity_all = np.concatenate(capacities)
    kept = capacity_all > 0
    graph = sparse.csr_matrix((capacity_all[kept].astype(np.int32), (np.concatenate(tails)[kept], np.concatenate(heads)[kept])),
                              shape=(count + 2, count + 2))
    residual = (graph - maximum_flow(graph, source, sink, method="dinic").flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    side = np.zeros(count + 2, bool)
    side[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
    return side[:count].reshape(shape)


@pytest.mark.parametrize(("between", "expected"), [
    (2, [True, False]),  # cutting the arc (2) is cheaper than the second node's sink (3) or the first's source (5)
    (4, [True, True]),   # the second node's sink (3) is the cheapest
    (9, [True, True]),
])
def test_two_nodes_by_hand(between, expected):
    """Node A: 5 from the source; node B: 3 to the sink; A → B holds ``between`` (B → A nothing)."""
    capacity = np.zeros((1, 1, 2, 6), np.int32)
    capacity[0, 0, 0, 4] = between  # +col
    terminal = np.array([[[5, -3]]])
    assert grid_min_cut(capacity, terminal).ravel().tolist() == expected


def test_chain_by_hand_and_the_smallest_source_side():
    """Source 4 → a → b → c → d → sink 4, arcs of 3, 1, 3 along +z: the cut is the middle arc (1). After a
    flow of 1 the source reaches a (3 left) and b (a → b has 2 left), not c (b → c is full): {a, b}. A node
    with no terminal and no arc stays on the sink side (the smallest source side)."""
    capacity = np.zeros((4, 1, 1, 6), np.int32)
    capacity[0, 0, 0, 0], capacity[1, 0, 0, 0], capacity[2, 0, 0, 0] = 3, 1, 3
    terminal = np.array([4, 0, 0, -4]).reshape(4, 1, 1)
    assert grid_min_cut(capacity, terminal).ravel().tolist() == [True, True, False, False]
    assert not grid_min_cut(np.zeros((1, 1, 1, 6), np.int32), np.zeros((1, 1, 1), np.int64)).any()


def test_arcs_leaving_the_grid_and_the_inputs_are_kept():
    """Capacities on arcs that would leave the grid are ignored (not wrapped to the next row), and the
    caller's arrays are not changed by the flow."""
    capacity = np.full((2, 2, 2, 6), 7, np.int32)
    terminal = np.array([[[9, 0], [0, 0]], [[0, 0], [0, -9]]])
    kept_capacity, kept_terminal = capacity.copy(), terminal.copy()
    assert np.array_equal(grid_min_cut(capacity, terminal), scipy_source_side(np.where(_leaves((2, 2, 2)), 0, capacity), terminal))
    assert np.array_equal(capacity, kept_capacity) and np.array_equal(terminal, kept_terminal)
    with pytest.raises(ValueError, match="does not match"):
        grid_min_cut(capacity[..., :5], terminal)
    with pytest.raises(ValueError, match="below"):
        grid_min_cut(np.full((2, 2, 2, 6), 1 << 30, np.int64), terminal)


def _leaves(shape: tuple[int, int, int]) -> np.ndarray:
    """(shape, 6) bool: the arcs that would leave a grid of ``shape``."""
    coordinates = np.indices(shape)
    return np.stack([np.any([(coordinates[axis] + step[axis] < 0) | (coordinates[axis] + step[axis] >= shape[axis]) for axis in range(3)], axis=0)
                     for step in DIRECTIONS], axis=-1)


def test_same_source_side_as_scipy_on_random_grids():
    """300 random grids up to 8³: capacities 0-50 (some arcs one-way, some nodes without a terminal)."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 9, 3))
        capacity = rng.integers(0, 50, (*shape, 6)).astype(np.int32) * (rng.random((*shape, 6)) < 0.8)
        capacity[_leaves(shape)] = 0
        terminal = rng.integers(-60, 61, shape) * (rng.random(shape) < 0.7)
        assert np.array_equal(grid_min_cut(capacity, terminal), scipy_source_side(capacity, terminal)), shape


def test_ct_graph_by_hand():
    """Two voxels side by side along the columns, 2 mm apart: p 0.9 (organ) and 0.2, 100 and 90 HU; smoothness
    10, contrast 10 HU, a hundredth of a nat. Terminals rint(100 log 9) = 220 and rint(100 log 0.25) = −139;
    the arc each way rint(100 · 10 / 2 · exp(−10² / 200)) = rint(303.27) = 303. With the second voxel fixed
    (background) the first has no arc and 220 − 303 = −83; with the first fixed (organ) the second
    −139 + 303 = 164. A probability of one half is one unit towards the voxel's own side."""
    probability = np.array([[[0.9, 0.2]]], np.float32)
    ct_hu = np.array([[[100.0, 90.0]]], np.float32)
    organ = np.array([[[True, False]]])
    spacing_mm = (1.0, 1.0, 2.0)

    def graph(free=None, p=probability):
        residual, terminal = ct_graph(p, ct_hu, organ, free, spacing_mm, 10.0, 10.0, 100.0, 1e-4)
        assert residual.shape == (3, 3, 4, 6) and not residual[[0, -1]].any() and not terminal[:, :, [0, -1]].any()  # the border
        return residual[1, 1, 1:-1], terminal[1, 1, 1:-1]

    residual, terminal = graph()
    assert terminal.tolist() == [220, -139] and residual.tolist() == [[0, 0, 0, 0, 303, 0], [0, 0, 0, 0, 0, 303]]
    residual, terminal = graph(np.array([[[True, False]]]))
    assert terminal.tolist() == [-83, 0] and not residual.any()
    residual, terminal = graph(np.array([[[False, True]]]))
    assert terminal.tolist() == [0, 164] and not residual.any()
    assert graph(p=np.full((1, 1, 2), 0.5, np.float32))[1].tolist() == [1, -1]
    with pytest.raises(ValueError, match="below"):
        ct_graph(probability, ct_hu, organ, None, (1e-6, 1.0, 1.0), 1e4, 10.0, 100.0, 1e-4)


def test_liver_cut_of_a_real_ct_matches_scipy(data_root, monkeypatch):
    """ircad_01's expert liver blurred into a probability map on the 3 mm grid of a cascade's stage 1 (a
    probability of 0.7 inside, 0.3 within 6 mm outside), cut on its CT (128, 10): the source side of our
    max-flow is SciPy's, node for node, on the graph that cut_organ builds."""
    ct, label = read_case(data_root, "ircad_01")
    step = (2, 6, 6)
    ct_hu = sitk.GetArrayFromImage(ct)[:: step[0], :: step[1], :: step[2]].astype(np.float32)
    liver = sitk.GetArrayFromImage(label)[:: step[0], :: step[1], :: step[2]] >= 1
    spacing_mm = tuple(s * k for s, k in zip(reversed(ct.GetSpacing()), step))
    near = ndimage.distance_transform_edt(~liver, sampling=spacing_mm) <= 6
    probability = np.where(liver, 0.7, np.where(near, 0.3, 0.01)).astype(np.float32)
    captured = {}

    def solver(residual, terminal):
        captured["graph"] = residual[1:-1, 1:-1, 1:-1].copy(), terminal[1:-1, 1:-1, 1:-1].copy()  # without the border
        return padded_min_cut(residual, terminal)

    monkeypatch.setattr("LiverSegLib.mincut.padded_min_cut", solver)  # keeps the graph cut_organ builds
    organ = cut_organ(probability, ct_hu, spacing_mm, 128.0, 10.0)
    capacity, terminal = captured["graph"]
    assert terminal.size > 50_000 and not capacity[_leaves(terminal.shape)].any()
    assert np.array_equal(grid_min_cut(capacity, terminal), scipy_source_side(capacity, terminal))
    assert not np.array_equal(organ, liver)  # the cut did move the boundary


# Runs the CLI in a Python where importing numba raises, as on an install without the graphcut extra.
WITHOUT_NUMBA = """
import importlib.abc, sys
class NoNumba(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ImportError(name + " is not installed")
sys.meta_path.insert(0, NoNumba())
from LiverSegLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_card_with_a_cut_without_numba_is_refused_in_one_line(model_copy, tmp_path):
    """A copy of the bundled model whose card asks for a graph cut, run where numba cannot be imported:
    exit 2 before any inference, one line naming what to install, no output file."""
    card_path, _ = model_copy
    data = json.loads(card_path.read_text(encoding="utf-8"))
    data["graph_cut"] = {"smoothness": 128.0, "contrast_hu": 10.0}
    card_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    sample = PROJECT_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"
    output = tmp_path / "out.nii.gz"
    run = subprocess.run([sys.executable, "-c", WITHOUT_NUMBA, "segment", str(sample), "-o", str(output), "--model", str(card_path), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "graph cut needs numba" in lines[0] and "liverseg[graphcut]" in lines[0], run.stderr
    assert not output.exists()


def test_a_card_says_whether_it_cuts_and_what_that_needs(model_copy):
    """``ModelCard.cuts``: the bundled card does not; a card with stage 1's cut or only stage 2's does. What the
    Slicer module installs then names numba with the bounds of pyproject's ``graphcut`` extra."""
    import tomllib
    from dataclasses import replace

    from LiverSegLib.dependencies import GRAPH_CUT_REQUIREMENT, missing_modules
    from LiverSegLib.model import read_card

    card = read_card(model_copy[0])
    assert not card.cuts()
    assert replace(card, graph_cut={"smoothness": 128.0, "contrast_hu": 10.0}).cuts()
    stage2 = replace(card, graph_cut={}, weights_file="liverseg.stage2.safetensors")
    cascade = card.with_stage(2, replace(stage2, graph_cut={"smoothness": 128.0, "contrast_hu": 10.0}, crop_margin_mm=15.0))
    assert cascade.cuts() and not card.with_stage(2, replace(stage2, crop_margin_mm=15.0)).cuts()
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extras["graphcut"] == [GRAPH_CUT_REQUIREMENT] and "liverseg[graphcut]" in extras["train"]
    assert missing_modules("cpu", graph_cut=True) == []  # numba is installed here (the test extra)
