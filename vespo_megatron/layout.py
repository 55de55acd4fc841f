"""The rank grid of a run, computed in pure Python before any process group exists.

Megatron-Core numbers ranks in the order ``tp-cp-ep-dp-pp`` (tensor-parallel fastest, pipeline slowest)
and builds two grids over the same ranks: the dense grid ``tp x cp x dp x pp`` (attention, embeddings,
dense MLPs) and the expert grid ``etp x ep x edp x pp`` (MoE experts). A rank's coordinates in a grid
are its mixed-radix digits, ``rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))``; a group
of kind ``"tp-cp"`` is the set of ranks that share every *other* digit. :func:`build_layout` lists every
group Megatron's ``parallel_state.initialize_model_parallel`` creates, in the same order, so
``check-config`` can print them and the distributed tests can compare them with the real groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from vespo_megatron.config import ParallelConfig

ORDER = ("tp", "cp", "ep", "dp", "pp")
"""Megatron's default rank order, fastest-varying first."""

DENSE_GROUPS = ("tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-pp", "tp-dp", "tp-dp-cp")
EXPERT_GROUPS = ("ep", "tp", "tp-ep", "tp-ep-pp", "dp")
GROUP_NAMES = {
    # our name: (grid, kind in that grid)
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "pp": ("dense", "pp"),
    "dp_cp": ("dense", "dp-cp"),
    "tp_cp": ("dense", "tp-cp"),
    "model_parallel": ("dense", "tp-pp"),
    "tp_dp": ("dense", "tp-dp"),
    "tp_dp_cp": ("dense", "tp-dp-cp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "etp_ep": ("expert", "tp-ep"),
    "etp_ep_pp": ("expert", "tp-ep-pp"),
    "expert_dp": ("expert", "dp"),
}
"""Each group this module names, and the grid and kind Megatron builds it from."""


def grid_groups(sizes: dict[str, int], kind: str) -> list[list[int]]:
    """Groups of ``kind`` (e.g. ``"tp-cp"``) in a grid with ``sizes`` listed fastest-varying first.

    Groups come in Megatron's order: the first group holds rank 0 and groups are enumerated with the
    fastest remaining axis varying first; inside a group the ranks ascend along the chosen axes in
    the grid order.
    """
    names = list(sizes)
    strides, stride = {}, 1
    for name in names:
        strides[name] = stride
        stride *= sizes[name]
    chosen = set(kind.split("-"))
    unknown = chosen - set(names)
    if unknown:
        raise ValueError(f"group kind {kind!r} names axes {sorted(unknown)} that are not in {names}")
    inner = [n for n in names if n in chosen]
    outer = [n for n in names if n not in chosen]

    def offsets(axes: list[str]) -> list[int]:
        # Mixed-radix enumeration with the first axis fastest: reverse for itertools.product.
        ranges = [range(sizes[a]) for a in reversed(axes)]
        return [sum(i * strides[a] for a, i in zip(reversed(axes), digits)) for digits in product(*ranges)]

    return [[base + off for off in offsets(inner)] for base in offsets(outer)]


@dataclass(frozen=True)
class RankLayout:
    """Every process group of a run, as lists of global ranks."""

    world_size: int
    tp: int
    cp: int
    dp: int
    pp: int
    vpp: int | None
    ep: int
    etp: int
    expert_dp: int
    groups: dict[str, list[list[int]]] = field(repr=False)
    """Our group name (see :data:`GROUP_NAMES`, plus ``embedding``/``position_embedding``) -> groups."""

    def group_of(self, name: str, rank: int) -> list[int]:
        """The ranks of the ``name`` group that holds ``rank``."""
        for ranks in self.groups[name]:
            if rank in ranks:
                return ranks
        raise KeyError(f"rank {rank} is in no {name} group (world size {self.world_size})")

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index in each parallel dimension (dense and expert grids)."""
        _check_rank(rank, self.world_size)
        dense = _digits(rank, {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp})
        expert = _digits(rank, {"etp": self.etp, "ep": self.ep, "expert_dp": self.expert_dp, "pp": self.pp})
        return {**dense, "ep": expert["ep"], "etp": expert["etp"], "expert_dp": expert["expert_dp"]}

    def groups_crossing_nodes(self, gpus_per_node: int) -> list[str]:
        """Names of group kinds with at least one group spread over more than one node."""
        return [
            name
            for name, groups in self.groups.items()
            if any(len({r // gpus_per_node for r in ranks}) > 1 for ranks in groups)
        ]

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "sizes": {
                "tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp, "vpp": self.vpp,
                "ep": self.ep, "etp": self.etp, "expert_dp": self.expert_dp,
            },
            "groups": self.groups,
        }


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")


def _digits(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, size in sizes.items():
        out[name] = rank % size
        rank //= size
    return out


def build_layout(par: ParallelConfig, world_size: int) -> RankLayout:
    """The groups Megatron builds for ``par`` on ``world_size`` ranks (validate the config first)."""
    dense_size = par.tp * par.cp * par.pp
    expert_size = par.expert_tp * par.ep * par.pp
    if world_size % dense_size or world_size % expert_size:
        raise ValueError(
            f"world size {world_size} does not fit tp*cp*pp={dense_size} and etp*ep*pp={expert_size}; "
            "run config.validate first for the fix"
        )
    dp = world_size // dense_size
    expert_dp = world_size // expert_size
    dense = {"tp": par.tp, "cp": par.cp, "dp": dp, "pp": par.pp}
    expert = {"tp": par.expert_tp, "ep": par.ep, "dp": expert_dp, "pp": par.pp}
    grids = {"dense": dense, "expert": expert}
    groups = {name: grid_groups(grids[grid], kind) for name, (grid, kind) in GROUP_NAMES.items()}
    # Embedding groups: first and last stage of each pipeline (the tied-embedding all-reduce).
    groups["embedding"] = [sorted({p[0], p[-1]}) for p in groups["pp"]]
    groups["position_embedding"] = [[p[0]] for p in groups["pp"]]
    return RankLayout(
        world_size=world_size,
        tp=par.tp,
        cp=par.cp,
        dp=dp,
        pp=par.pp,
        vpp=par.vpp,
        ep=par.ep,
        etp=par.expert_tp,
        expert_dp=expert_dp,
        groups=groups,
    )


def _short(groups: list[list[int]], limit: int) -> str:
    def one(ranks: list[int]) -> str:
        if len(ranks) > 8:
            return f"[{ranks[0]},{ranks[1]},..,{ranks[-1]}]"
        return "[" + ",".join(str(r) for r in ranks) + "]"

    shown = [one(g) for g in groups[:limit]]
    if len(groups) > limit:
        shown += ["..", one(groups[-1])]
    return " ".join(shown)


def render_layout(layout: RankLayout, gpus_per_node: int | None = None, limit: int = 4) -> str:
    """Human-readable rank grid: sizes, the first groups of each kind and which kinds cross nodes."""
    lines = [
        f"world {layout.world_size} = tp {layout.tp} x cp {layout.cp} x dp {layout.dp} x pp {layout.pp}"
        + (f" (vpp {layout.vpp})" if layout.vpp else ""),
        f"experts: etp {layout.etp} x ep {layout.ep} x expert-dp {layout.expert_dp} x pp {layout.pp}",
    ]
    width = max(len(n) for n in layout.groups)
    for name, groups in layout.groups.items():
        lines.append(f"  {name:<{width}}  {len(groups):>5} x {len(groups[0]):<5} {_short(groups, limit)}")
    if gpus_per_node:
        crossing = layout.groups_crossing_nodes(gpus_per_node)
        slow = [n for n in crossing if n in ("tp", "tp_cp", "etp", "cp")]
        lines.append(f"groups spanning nodes ({gpus_per_node} GPUs/node): {', '.join(crossing) or 'none'}")
        if slow:
            lines.append(
                f"warning: {', '.join(slow)} groups cross nodes; their per-layer collectives will run over the "
                "network. Keep tp (and cp) within a node."
            )
    return "\n".join(lines)
