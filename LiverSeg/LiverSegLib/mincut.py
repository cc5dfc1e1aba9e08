"""The exact minimum s-t cut of a 6-connected 3-D grid graph, by Boykov and Kolmogorov's augmenting-path
algorithm (Boykov and Kolmogorov 2004, "An experimental comparison of min-cut/max-flow algorithms for energy
minimization in vision", IEEE TPAMI 26(9)), written here and compiled by Numba.

Why our own: on a liver's graph SciPy's Dinic (``scipy.sparse.csgraph.maximum_flow``) takes 2–30 s
(benchmarks/README.md, "Graph cuts of the liver"), and the fast implementations on PyPI (PyMaxflow,
thinmaxflow, gco-wrapper) wrap Kolmogorov's C++ code, which is GPL or research-only; OR-Tools' push-relabel
is only twice as fast as SciPy. Two search trees grown from the terminals and reused after each
augmentation are what makes the algorithm fast on image grids, where augmenting paths are short.

The grid is held implicitly: node ``v`` of a (Z, rows, cols) array has six arcs ``6 v + d`` towards its
neighbours in the directions +z, −z, +row, −row, +col, −col, the reverse of arc ``6 v + d``
being ``6 w + (d ^ 1)`` at the neighbour ``w``. ``grid_min_cut`` gives the grid a border of isolated nodes,
so that no arc leaves it. ``ct_graph`` builds the graph of an organ on a CT (``postprocessing.cut_organ``)
straight into such bordered arrays, in one compiled pass; ``padded_min_cut`` solves them."""

from __future__ import annotations

import numpy as np
from numba import njit

_FREE = -1  # a node in neither search tree
_TERMINAL = -2  # its parent is the terminal itself
_ORPHAN = -3  # cut from its tree by the last augmentation
_INFINITE_DISTANCE = 1 << 30
_LARGEST_CAPACITY = 1 << 30  # int32 residuals


def grid_min_cut(capacity: np.ndarray, terminal: np.ndarray) -> np.ndarray:
    """The source side (bool, the grid's shape) of the minimum cut: the nodes the source reaches in the
    residual graph of a maximum flow (the smallest source side of a minimum cut; what SciPy's
    ``maximum_flow`` and a breadth-first search of its residual give).

    ``capacity``: (Z, rows, cols, 6) int, each arc's capacity towards its neighbour in the directions +z, −z,
    +row, −row, +col, −col (arcs that leave the grid are ignored). ``terminal``: (Z, rows, cols) int, the net
    capacity from the source (> 0) or to the sink (< 0) of each node: only the difference of a node's two
    terminal capacities changes the cut."""
    if capacity.shape != (*terminal.shape, 6):
        raise ValueError(f"capacity {capacity.shape} does not match the grid {terminal.shape}")
    capacity = np.pad(capacity, ((1, 1), (1, 1), (1, 1), (0, 0)))  # isolated nodes all round: no arc leaves the grid
    for axis in range(3):  # the grid's own arcs that would leave it
        capacity[(*(slice(None) if each != axis else 1 for each in range(3)), 2 * axis + 1)] = 0
        capacity[(*(slice(None) if each != axis else -2 for each in range(3)), 2 * axis)] = 0
    if capacity.size and int(capacity.max()) >= _LARGEST_CAPACITY:
        raise ValueError(f"arc capacities must stay below {_LARGEST_CAPACITY}: the residual of an arc can double")
    return padded_min_cut(capacity.astype(np.int32, copy=False), np.pad(terminal, 1).astype(np.int64))


def padded_min_cut(residual: np.ndarray, terminal: np.ndarray) -> np.ndarray:
    """``grid_min_cut`` of a graph given with its border of isolated nodes (``residual`` (Z + 2, rows + 2,
    cols + 2, 6) int32, ``terminal`` (Z + 2, rows + 2, cols + 2) int64, as ``ct_graph`` builds it), which the
    flow changes in place; the source side without the border."""
    shape = terminal.shape
    steps = np.array([shape[1] * shape[2], -shape[1] * shape[2], shape[2], -shape[2], 1, -1], np.int64)
    source_side = _boykov_kolmogorov(residual.reshape(-1), terminal.reshape(-1), steps)
    return source_side.reshape(shape)[1:-1, 1:-1, 1:-1]


def ct_graph(
    probability: np.ndarray, ct_hu: np.ndarray, organ: np.ndarray, free: np.ndarray | None, spacing_mm: tuple[float, float, float],
    smoothness: float, contrast_hu: float, cost_scale: float, probability_floor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(capacity, terminal) of Boykov and Jolly's graph of an organ on a CT (``postprocessing.cut_organ``
    says why), with the border of ``padded_min_cut``, built in one compiled pass (in NumPy it took longer than
    the flow). In units of 1 / ``cost_scale`` nat, rounded: each free voxel's terminal is its logit
    log(p / (1 − p)), p clipped to ``probability_floor``…1 − ``probability_floor``, at least one unit towards
    its side in ``organ``; each pair of free 6-neighbours has an arc each way of ``smoothness`` ·
    exp(−ΔHU² / 2 ``contrast_hu``²) / their distance in mm; a free voxel beside a fixed one (``free`` False:
    no arc, no terminal) has that cost added towards the fixed voxel's side in ``organ``."""
    arc_costs = np.array([smoothness / step * cost_scale for step in spacing_mm], np.float64)
    if arc_costs.max(initial=0.0) >= _LARGEST_CAPACITY:
        raise ValueError(f"arc capacities must stay below {_LARGEST_CAPACITY}: the residual of an arc can double")
    padded = tuple(size + 2 for size in probability.shape)
    residual = np.zeros((*padded, 6), np.int32)
    terminal = np.zeros(padded, np.int64)
    every = np.ones(probability.shape, np.bool_) if free is None else free
    _build_ct_graph(probability, ct_hu, organ, every, arc_costs, -0.5 / contrast_hu**2, cost_scale, probability_floor, residual, terminal)
    return residual, terminal


@njit(cache=True, nogil=True)
def _build_ct_graph(
    probability: np.ndarray, ct_hu: np.ndarray, organ: np.ndarray, free: np.ndarray, arc_costs: np.ndarray, contrast: float,
    cost_scale: float, floor: float, residual: np.ndarray, terminal: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Fill ``ct_graph``'s zeroed ``residual`` and ``terminal`` (padded) from the unpadded inputs."""
    depth, rows, cols = probability.shape
    for z in range(depth):
        for r in range(rows):
            for c in range(cols):
                is_free = free[z, r, c]
                if is_free:
                    p = min(max(np.float64(probability[z, r, c]), floor), 1.0 - floor)
                    logit = np.int64(np.rint(np.log(p / (1.0 - p)) * cost_scale))
                    terminal[z + 1, r + 1, c + 1] += max(logit, 1) if organ[z, r, c] else min(logit, -1)
                for axis in range(3):
                    z2, r2, c2 = z + (axis == 0), r + (axis == 1), c + (axis == 2)
                    if z2 == depth or r2 == rows or c2 == cols:
                        continue
                    other_free = free[z2, r2, c2]
                    if not (is_free or other_free):
                        continue
                    step_hu = np.float64(ct_hu[z2, r2, c2]) - np.float64(ct_hu[z, r, c])
                    cost = np.int64(np.rint(arc_costs[axis] * np.exp(contrast * step_hu * step_hu)))
                    if is_free and other_free:
                        residual[z + 1, r + 1, c + 1, 2 * axis] = cost  # towards +axis
                        residual[z2 + 1, r2 + 1, c2 + 1, 2 * axis + 1] = cost  # and back
                    elif is_free:  # pulled to the fixed neighbour's side
                        terminal[z + 1, r + 1, c + 1] += cost if organ[z2, r2, c2] else -cost
                    else:
                        terminal[z2 + 1, r2 + 1, c2 + 1] += cost if organ[z, r, c] else -cost


@njit(cache=True, nogil=True, inline="always")
def _arcs_between(node: int, direction: int, steps: np.ndarray) -> tuple[int, int, int]:  # pragma: no cover - compiled
    """(the arc from ``node`` in ``direction``, the neighbour it leads to, the arc back)."""
    neighbour = node + steps[direction]
    return 6 * node + direction, neighbour, 6 * neighbour + (direction ^ 1)


@njit(cache=True, nogil=True, inline="always")
def _orphan_in_front(node: int, parent: np.ndarray, orphans: np.ndarray, first: int) -> int:  # pragma: no cover - compiled
    """Mark ``node`` an orphan and put it in front of the ring ``orphans`` (one slot more than there are
    nodes), where an augmentation's orphans go; the ring's new first index."""
    parent[node] = _ORPHAN
    first = first - 1 if first > 0 else len(orphans) - 1
    orphans[first] = node
    return first


@njit(cache=True, nogil=True)
def _boykov_kolmogorov(residual: np.ndarray, terminal: np.ndarray, steps: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """The source tree at the end (bool per node): the trees grow from the terminals' nodes until they meet,
    the path where they meet is augmented, the nodes it cuts off are adopted again or freed, and so on until
    neither tree can grow (the paper's sections 3.1-3.3, with its distance and time-stamp heuristic for the
    adoption). ``residual`` (arcs) and ``terminal`` (nodes) are the flow's residual capacities, changed in
    place; ``steps`` is the index offset of each of the six directions."""
    node_count = terminal.shape[0]
    parent = np.full(node_count, _FREE, np.int64)  # the arc from a node to its parent (towards its terminal)
    in_sink_tree = np.zeros(node_count, np.bool_)
    stamp = np.zeros(node_count, np.int64)  # when ``distance`` was last known right
    distance = np.zeros(node_count, np.int64)  # arcs to the terminal
    active = np.empty(node_count + 1, np.int64)  # a ring of the nodes that may still grow their tree
    is_active = np.zeros(node_count, np.bool_)
    head = tail = 0
    for node in range(node_count):
        if terminal[node] != 0:
            parent[node] = _TERMINAL
            in_sink_tree[node] = terminal[node] < 0
            distance[node] = 1
            active[tail] = node
            tail += 1
            is_active[node] = True
    orphans = np.empty(node_count + 1, np.int64)  # a ring: the augmentation's orphans in front, their children behind
    orphan_first = 0
    orphan_end = 0
    time = 0
    current = -1
    while True:
        if current < 0 or parent[current] == _FREE:  # the next active node still in a tree
            current = -1
            while head != tail:
                node = active[head]
                head = head + 1 if head < node_count else 0
                is_active[node] = False
                if parent[node] != _FREE:
                    current = node
                    break
            if current < 0:
                break
        # grow the current node's tree until it meets the other tree (the arc from the source tree across)
        meeting_arc = -1
        sink_side = in_sink_tree[current]
        for direction in range(6):
            arc, neighbour, back = _arcs_between(current, direction, steps)
            if (residual[back] if sink_side else residual[arc]) <= 0:
                continue
            if parent[neighbour] == _FREE:
                in_sink_tree[neighbour] = sink_side
                parent[neighbour] = back
                stamp[neighbour] = stamp[current]
                distance[neighbour] = distance[current] + 1
                if not is_active[neighbour]:
                    is_active[neighbour] = True
                    active[tail] = neighbour
                    tail = tail + 1 if tail < node_count else 0
            elif in_sink_tree[neighbour] != sink_side:
                meeting_arc = back if sink_side else arc
                break
            elif stamp[neighbour] <= stamp[current] and distance[neighbour] > distance[current]:
                parent[neighbour] = back  # a shorter way to the terminal
                stamp[neighbour] = stamp[current]
                distance[neighbour] = distance[current] + 1
        time += 1
        if meeting_arc < 0:
            current = -1
            continue
        # augment along source → ... → tail of the meeting arc → its head → ... → sink
        from_node = meeting_arc // 6
        to_node = from_node + steps[meeting_arc % 6]
        bottleneck = residual[meeting_arc]
        node = from_node
        while parent[node] != _TERMINAL:
            arc = parent[node]
            upper = arc // 6 + steps[arc % 6]
            bottleneck = min(bottleneck, residual[6 * upper + ((arc % 6) ^ 1)])
            node = upper
        bottleneck = min(bottleneck, terminal[node])
        node = to_node
        while parent[node] != _TERMINAL:
            arc = parent[node]
            bottleneck = min(bottleneck, residual[arc])
            node = arc // 6 + steps[arc % 6]
        bottleneck = min(bottleneck, -terminal[node])
        residual[meeting_arc] -= bottleneck
        residual[6 * to_node + ((meeting_arc % 6) ^ 1)] += bottleneck
        node = from_node
        while parent[node] != _TERMINAL:
            arc = parent[node]
            upper = arc // 6 + steps[arc % 6]
            down = 6 * upper + ((arc % 6) ^ 1)
            residual[arc] += bottleneck
            residual[down] -= bottleneck
            if residual[down] == 0:
                orphan_first = _orphan_in_front(node, parent, orphans, orphan_first)
            node = upper
        terminal[node] -= bottleneck
        if terminal[node] == 0:
            orphan_first = _orphan_in_front(node, parent, orphans, orphan_first)
        node = to_node
        while parent[node] != _TERMINAL:
            arc = parent[node]
            upper = arc // 6 + steps[arc % 6]
            residual[arc] -= bottleneck
            residual[6 * upper + ((arc % 6) ^ 1)] += bottleneck
            if residual[arc] == 0:
                orphan_first = _orphan_in_front(node, parent, orphans, orphan_first)
            node = upper
        terminal[node] += bottleneck
        if terminal[node] == 0:
            orphan_first = _orphan_in_front(node, parent, orphans, orphan_first)
        # adopt the orphans: a new parent in the same tree whose path reaches the terminal, or free them
        while orphan_first != orphan_end:
            orphan = orphans[orphan_first]
            orphan_first = orphan_first + 1 if orphan_first < node_count else 0
            sink_side = in_sink_tree[orphan]
            best_arc = -1
            best_distance = _INFINITE_DISTANCE
            for direction in range(6):
                arc, neighbour, back = _arcs_between(orphan, direction, steps)
                if (residual[arc] if sink_side else residual[back]) <= 0:
                    continue
                if parent[neighbour] == _FREE or in_sink_tree[neighbour] != sink_side:
                    continue
                length = 0
                node = neighbour
                while True:  # does the neighbour's path reach the terminal?
                    if stamp[node] == time:
                        length += distance[node]
                        break
                    arc_up = parent[node]
                    length += 1
                    if arc_up == _TERMINAL:
                        stamp[node] = time
                        distance[node] = 1
                        break
                    if arc_up == _ORPHAN:
                        length = _INFINITE_DISTANCE
                        break
                    node = arc_up // 6 + steps[arc_up % 6]
                if length < _INFINITE_DISTANCE:
                    if length < best_distance:
                        best_arc = arc
                        best_distance = length
                    node = neighbour
                    while stamp[node] != time:
                        stamp[node] = time
                        distance[node] = length
                        length -= 1
                        arc_up = parent[node]
                        node = arc_up // 6 + steps[arc_up % 6]
            if best_arc >= 0:
                parent[orphan] = best_arc
                stamp[orphan] = time
                distance[orphan] = best_distance + 1
                continue
            parent[orphan] = _FREE
            for direction in range(6):
                arc, neighbour, back = _arcs_between(orphan, direction, steps)
                if parent[neighbour] == _FREE or in_sink_tree[neighbour] != sink_side:
                    continue
                if (residual[arc] if sink_side else residual[back]) > 0 and not is_active[neighbour]:
                    is_active[neighbour] = True
                    active[tail] = neighbour
                    tail = tail + 1 if tail < node_count else 0
                arc_up = parent[neighbour]
                if arc_up >= 0 and arc_up // 6 + steps[arc_up % 6] == orphan:
                    parent[neighbour] = _ORPHAN
                    orphans[orphan_end] = neighbour
                    orphan_end = orphan_end + 1 if orphan_end < node_count else 0
    return (parent != _FREE) & ~in_sink_tree
