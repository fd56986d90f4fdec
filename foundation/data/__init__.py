"""Data layer: atoms <-> graphs, neighbor lists, LMDB shards, manifest, sampling, statistics."""
from .graph import add_edges, build_graph, from_atoms, neighbor_list
from .loader import Loader, MixedDataset, collate, make_loader
from .sampling import AtomBudgetBatchSampler, mixing_probabilities

__all__ = ["from_atoms", "build_graph", "add_edges", "neighbor_list", "ShardedDataset",
           "MixedDataset", "AtomBudgetBatchSampler", "mixing_probabilities", "collate", "make_loader", "Loader"]


def __getattr__(name):
    if name == "ShardedDataset":
        from .dataset import ShardedDataset
        return ShardedDataset
    raise AttributeError(name)
