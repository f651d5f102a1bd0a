"""Hierarchical sparse plus low rank (HSS; Kumar & Gupta, 2025): W ≈ S + P_rᵀ·H·P_c, the `hss` method.

1. S = the largest |W·D| entries of the layer (D = diag(‖X_j‖), as sslc and wanda scale; one pool per matrix).
2. The residual R = (W - S)·D is reordered by reverse Cuthill-McKee (RCM) on the bipartite graph of its largest
   entries (GRAPH_DEGREE per row and column on average): rows and columns get separate orders, so rectangular
   layers work too. Large entries then sit near the diagonal, inside the blocks that stay dense. S is then chosen
   again among the entries outside those blocks (inside, H holds every entry exactly).
3. H = the reordered R in a hierarchical off-diagonal low-rank form: split the rows and the columns in halves, the
   two off-diagonal blocks become rank-k truncated SVDs, the two diagonal blocks recurse, blocks whose larger side
   is at most `leaf` stay dense. The rank falls with depth (the "recursive rank-reducing strategy"): k_l =
   max(1, k_0 >> l), halving as the blocks halve; k_0 is the largest that fits the budget. The bases are not
   nested (HODLR rather than HSS with translation operators): simpler; nested bases would store less at the
   same ranks.
4. S's support stays fixed, but its entries are free: the zeros left in R there are holes that break the
   off-diagonal blocks' low rank. So H is rebuilt REFITS times on R with those entries replaced by H's own
   previous values (low-rank completion), and S = W·D - H on its support at the end. Then D is undone: in S, in
   the column factors (V of every block) and in the dense leaves.

Budget, as every method: nnz(S) + Σ leaves' entries + Σ k_l·(rows + cols) of the off-diagonal blocks ≤
floor((1 - c)·m·n); `low_rank_share` of it goes to H, and what H's rank steps leave goes back to S, so the count
is exact. The orders are index arrays, like S's mask, and not counted.

H·x is a chain of thin matmuls (`HssNode.matmul`): per node, V of one block on half of x, then U; per leaf one
small dense matmul. For the checkpoint, the torch layer and the exports (`HssDecomposition.flattened`) the same
product is written as the U·V + S every other method produces, exactly and at the same parameter count: the
leaves are entries of W at known places outside S's, so they join S; every off-diagonal block's U and V become
columns of one U and rows of one V that are zero outside the block's rows and columns (their supports,
`factor_masks`, are stored and counted instead of r·(m + n)). H·x then costs one x·Vᵀ and one product with U,
each reading only its support on the `sparse` layout's operator. scipy is not in the project's environment, so
RCM is written out here (`reverse_cuthill_mckee`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from sslc_export.budget import Budget
from sslc_export.calibration import InputStatistics
from sslc_export.errors import UserError
from sslc_export.methods.base import Decomposition, Method, Settings, activation_scale
from sslc_export.patterns import Pattern, select

GRAPH_DEGREE = 4  # entries of the residual per row and column, on average, in the graph RCM orders
LEAF = 64  # a block whose larger side is at most this stays dense
LOW_RANK_SHARE = 0.5  # share of the kept budget given to H (the rest, and what H leaves, to S)
REFITS = 2  # times H is rebuilt with S's entries filled by H's own values (see step 4)


def reverse_cuthill_mckee(neighbours: list[list[int]]) -> list[int]:
    """RCM order of an undirected graph given as adjacency lists: breadth-first from a least-connected unvisited node
    of each component, neighbours visited in increasing degree, the whole order reversed."""
    degree = [len(adjacent) for adjacent in neighbours]
    visited = [False] * len(neighbours)
    order: list[int] = []
    for start in sorted(range(len(neighbours)), key=degree.__getitem__):
        if visited[start]:
            continue
        visited[start] = True
        queue = deque([start])
        while queue:
            node = queue.popleft()
            order.append(node)
            for adjacent in sorted((a for a in neighbours[node] if not visited[a]), key=degree.__getitem__):
                visited[adjacent] = True
                queue.append(adjacent)
    return order[::-1]


def bipartite_orders(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column orders from RCM on the bipartite graph of a boolean m x n pattern (row i is node i, column j
    node m + j)."""
    rows, cols = pattern.shape
    neighbours: list[list[int]] = [[] for _ in range(rows + cols)]
    for i, j in pattern.nonzero().tolist():
        neighbours[i].append(rows + j)
        neighbours[rows + j].append(i)
    order = reverse_cuthill_mckee(neighbours)
    return (torch.tensor([node for node in order if node < rows], dtype=torch.long),
            torch.tensor([node - rows for node in order if node >= rows], dtype=torch.long))


def is_leaf(rows: int, cols: int, leaf: int) -> bool:
    """Dense when the larger side is at most `leaf` (a smaller-side rule would leave thin layers, k_proj's 192 x 576,
    with leaves a third of the matrix), or when a side cannot be halved."""
    return max(rows, cols) <= leaf or min(rows, cols) < 2


def leaf_blocks(rows: int, cols: int, leaf: int, row: int = 0, col: int = 0) -> list[tuple[int, int, int, int]]:
    """(first row, first column, rows, columns) of the dense leaves of a rows x cols block, split as HssNode.build
    splits it."""
    if is_leaf(rows, cols, leaf):
        return [(row, col, rows, cols)]
    top, left = rows // 2, cols // 2
    return leaf_blocks(top, left, leaf, row, col) + leaf_blocks(rows - top, cols - left, leaf, row + top, col + left)


def level_rank(top_rank: int, level: int) -> int:
    return max(1, top_rank >> level)


def hss_params(rows: int, cols: int, top_rank: int, leaf: int = LEAF, level: int = 0) -> int:
    """Parameters of the hierarchical form of a rows x cols block, from its shape alone."""
    if is_leaf(rows, cols, leaf):
        return rows * cols
    top, left = rows // 2, cols // 2
    rank = level_rank(top_rank, level)
    off_diagonal = min(rank, top, cols - left) * (top + cols - left) + min(rank, rows - top, left) * (rows - top + left)
    return off_diagonal + hss_params(top, left, top_rank, leaf, level + 1) + hss_params(rows - top, cols - left, top_rank, leaf, level + 1)


@dataclass
class HssNode:
    """A block: dense (a leaf) or two children on the diagonal plus the two off-diagonal blocks as U·V pairs."""

    rows: int
    cols: int
    dense: torch.Tensor | None = None
    children: tuple[HssNode, HssNode] | None = None
    upper: tuple[torch.Tensor, torch.Tensor] | None = None  # rows of the first child x columns of the second
    lower: tuple[torch.Tensor, torch.Tensor] | None = None  # rows of the second child x columns of the first

    @classmethod
    def build(cls, block: torch.Tensor, top_rank: int, leaf: int = LEAF, level: int = 0) -> HssNode:
        rows, cols = block.shape
        if is_leaf(rows, cols, leaf):
            return cls(rows, cols, dense=block.clone())
        top, left = rows // 2, cols // 2
        rank = level_rank(top_rank, level)
        first = cls.build(block[:top, :left], top_rank, leaf, level + 1)
        second = cls.build(block[top:, left:], top_rank, leaf, level + 1)
        return cls(rows, cols, children=(first, second), upper=_truncated(block[:top, left:], rank),
                   lower=_truncated(block[top:, :left], rank))

    def params(self) -> int:
        if self.dense is not None:
            return self.dense.numel()
        return sum(u.numel() + v.numel() for u, v in (self.upper, self.lower)) + sum(child.params() for child in self.children)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """H·xᵀ as the export would compute it, x (..., cols) -> (..., rows): thin matmuls only."""
        if self.dense is not None:
            return x @ self.dense.T
        first, second = self.children
        x_left, x_right = x[..., :first.cols], x[..., first.cols:]
        (u_up, v_up), (u_low, v_low) = self.upper, self.lower
        return torch.cat([first.matmul(x_left) + (x_right @ v_up.T) @ u_up.T,
                          (x_left @ v_low.T) @ u_low.T + second.matmul(x_right)], dim=-1)

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        first, second = self.children
        return torch.cat([torch.cat([first.to_dense(), self.upper[0] @ self.upper[1]], dim=1),
                          torch.cat([self.lower[0] @ self.lower[1], second.to_dense()], dim=1)], dim=0)

    def scale_columns(self, scale: torch.Tensor) -> None:
        """Right-multiply by diag(scale) in place: the dense leaves' and the V factors' columns."""
        if self.dense is not None:
            self.dense *= scale
            return
        first, second = self.children
        self.upper[1].mul_(scale[first.cols:])
        self.lower[1].mul_(scale[:first.cols])
        first.scale_columns(scale[:first.cols])
        second.scale_columns(scale[first.cols:])


def _truncated(block: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    left, sigma, right = torch.linalg.svd(block, full_matrices=False)
    rank = min(rank, sigma.numel())
    return (left[:, :rank] * sigma[:rank]).contiguous(), right[:rank].contiguous()


@dataclass
class HssDecomposition:
    """W ≈ S + P_rᵀ·H·P_c: row_order[i] is the row of W that row i of H stands for (columns alike)."""

    sparse: torch.Tensor  # m x n, zeros outside mask
    mask: torch.Tensor
    row_order: torch.Tensor
    col_order: torch.Tensor
    tree: HssNode
    top_rank: int

    def params(self) -> int:
        return int(self.mask.sum()) + self.tree.params()

    def dense(self) -> torch.Tensor:
        hierarchical = torch.empty_like(self.sparse)
        hierarchical[self.row_order[:, None], self.col_order[None, :]] = self.tree.to_dense()
        return self.sparse + hierarchical

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ by the tree: one sparse product, a gather, the thin matmuls, a scatter."""
        out = x @ self.sparse.T
        out[..., self.row_order] += self.tree.matmul(x[..., self.col_order])
        return out

    def flattened(self) -> Decomposition:
        """The same matrix as S' + U·V in W's own order (module docstring): S' = S plus the leaves, U (m x R) and V
        (R x n) the off-diagonal blocks side by side, zero outside their supports."""
        blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        leaves: list[tuple[int, int, torch.Tensor]] = []
        _collect(self.tree, 0, 0, blocks, leaves)
        rows, cols = self.sparse.shape
        width = sum(u.shape[1] for _, _, u, _ in blocks)
        u_all, v_all = self.sparse.new_zeros(rows, width), self.sparse.new_zeros(width, cols)
        u_mask = torch.zeros(rows, width, dtype=torch.bool, device=self.sparse.device)
        v_mask = torch.zeros(width, cols, dtype=torch.bool, device=self.sparse.device)
        start = 0
        for row, col, u, v in blocks:
            block_rows = self.row_order[row : row + u.shape[0], None]
            block_cols = self.col_order[None, col : col + v.shape[1]]
            terms = torch.arange(start, start + u.shape[1], device=u.device)
            u_all[block_rows, terms[None, :]] = u
            u_mask[block_rows, terms[None, :]] = True
            v_all[terms[:, None], block_cols] = v
            v_mask[terms[:, None], block_cols] = True
            start += u.shape[1]
        sparse, mask = self.sparse.clone(), self.mask.clone()
        for row, col, dense in leaves:
            place = (self.row_order[row : row + dense.shape[0], None], self.col_order[None, col : col + dense.shape[1]])
            sparse[place] += dense
            mask[place] = True
        return Decomposition(u_all, v_all, sparse, mask, factor_masks=(u_mask, v_mask))


def _collect(node: HssNode, row: int, col: int, blocks: list, leaves: list) -> None:
    """The tree's off-diagonal blocks as (first row, first column, U, V) and its leaves as (row, column, dense), in H's
    own (permuted) coordinates."""
    if node.dense is not None:
        leaves.append((row, col, node.dense))
        return
    first, second = node.children
    blocks.append((row, col + first.cols, *node.upper))
    blocks.append((row + first.rows, col, *node.lower))
    _collect(first, row, col, blocks, leaves)
    _collect(second, row + first.rows, col + first.cols, blocks, leaves)


def fit_top_rank(rows: int, cols: int, allowed: int, leaf: int = LEAF) -> int:
    """The largest k_0 whose hierarchical form of a rows x cols block fits `allowed` parameters (0: not even rank 1)."""
    if hss_params(rows, cols, 1, leaf) > allowed:
        return 0
    low, high = 1, min(rows, cols)
    while low < high:  # the count grows with k_0
        middle = (low + high + 1) // 2
        low, high = (middle, high) if hss_params(rows, cols, middle, leaf) <= allowed else (low, middle - 1)
    return low


def leaf_size(rows: int, cols: int) -> int:
    """LEAF, or an eighth of the layer's larger side when that is smaller (so a small layer still has a hierarchy)."""
    return min(LEAF, max(rows, cols) // 8)


def checked_top_rank(budget: Budget, low_rank_share: float, leaf: int) -> int:
    """k_0 for a layer's budget, or a one-line error when not even its dense leaves fit."""
    rows, cols = budget.out_features, budget.in_features
    top_rank = fit_top_rank(rows, cols, math.floor(low_rank_share * budget.allowed), leaf)
    if top_rank == 0:
        raise UserError(f"hss: a {rows}x{cols} layer cannot hold its dense {leaf}-wide diagonal blocks in "
                        f"{low_rank_share:.0%} of its budget: use a lower --ratio")
    return top_rank


def decompose_hss(weight: torch.Tensor, stats: InputStatistics, budget: Budget, low_rank_share: float = LOW_RANK_SHARE,
                  leaf: int | None = None, reorder: bool = True, refits: int = REFITS) -> HssDecomposition:
    """The two stages on one layer; `reorder` False keeps W's own order (to measure what RCM brings); `leaf` None:
    leaf_size's."""
    rows, cols = weight.shape
    leaf = leaf_size(rows, cols) if leaf is None else leaf
    top_rank = checked_top_rank(budget, low_rank_share, leaf)
    nnz = budget.allowed - hss_params(rows, cols, top_rank, leaf)
    scale = activation_scale(stats).to(weight.device)
    scaled = weight * scale
    if reorder:
        residual = scaled * ~select(scaled.abs(), nnz, Pattern(scope="layer"))
        graph = select(residual.abs(), min(GRAPH_DEGREE * (rows + cols) // 2, residual.numel()), Pattern(scope="layer"))
        row_order, col_order = bipartite_orders(graph.cpu())
        row_order, col_order = row_order.to(weight.device), col_order.to(weight.device)
    else:
        row_order = torch.arange(rows, device=weight.device)
        col_order = torch.arange(cols, device=weight.device)
    # The leaves hold their entries exactly, so S's budget goes to the entries outside them.
    leaves = torch.zeros_like(weight, dtype=torch.bool)
    for row, col, height, width in leaf_blocks(rows, cols, leaf):
        leaves[row_order[row : row + height, None], col_order[None, col : col + width]] = True
    mask = select(scaled.abs() * ~leaves, nnz, Pattern(scope="layer"))
    target = scaled * ~mask
    for _ in range(refits + 1):
        tree = HssNode.build(target[row_order][:, col_order], top_rank, leaf)
        approximation = torch.empty_like(scaled)
        approximation[row_order[:, None], col_order[None, :]] = tree.to_dense()
        target = torch.where(mask, approximation, scaled)  # S's entries are free: let H take its own values there
    tree.scale_columns(1.0 / scale[col_order])
    return HssDecomposition((scaled - approximation) * mask / scale, mask, row_order, col_order, tree, top_rank)


class Hss(Method):
    """`--method hss`: the decomposition above, flattened into U·V + S for everything downstream."""

    name = "hss"
    patterns = ("unstructured",)

    def check_budget(self, budget: Budget) -> None:
        checked_top_rank(budget, LOW_RANK_SHARE, leaf_size(budget.out_features, budget.in_features))

    def decompose(self, weight: torch.Tensor, stats: InputStatistics, budget: Budget, pattern: Pattern,
                  settings: Settings) -> Decomposition:
        return decompose_hss(weight, stats, budget).flattened()
