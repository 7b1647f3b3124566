"""Analysis: find the depth-2 prunable structures in a graph view (no torch, no per-model
tables). ``channels`` follows every projection's output channels through the graph;
``structures`` turns what it found into named, frozen Structures."""
from goa_compiler.analysis.channels import interpret
from goa_compiler.analysis.structures import collect
from goa_compiler.ir.graph import Graph
from goa_compiler.ir.structure import Analysis


def analyze_graph(graph: Graph) -> Analysis:
    """The structures of ``graph`` and the projections refused, each with its reason."""
    return collect(interpret(graph))


__all__ = ["analyze_graph"]
