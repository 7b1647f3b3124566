"""Analysis: find the depth-2 prunable structures in a graph view (no torch, no per-model
tables). ``channels`` follows every projection's output channels through the graph;
``structures`` turns what it found into named, frozen Structures."""
from goa_compiler.analysis.channels import interpret
from goa_compiler.analysis.structures import collect
from goa_compiler.ir.graph import Graph
from goa_compiler.ir.structure import Analysis


def analyze_graph(graph: Graph, query_heads: bool = False) -> Analysis:
    """The structures of ``graph`` and the projections refused, each with its reason.
    ``query_heads``: grouped-K/V attention gets query-head units (channels.interpret)."""
    return collect(interpret(graph, query_heads))


__all__ = ["analyze_graph"]
