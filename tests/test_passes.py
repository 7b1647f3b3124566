"""The pass protocol (driver/passes.py) and the pipeline's passes: conditions checked,
failures name the pass, and every entry point runs the same pass list."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from goa_compiler.driver import pipeline
from goa_compiler.driver.options import CompileOptions
from goa_compiler.driver.passes import PassBase, PassError, PassManager, PassResult
from goa_compiler.ui.progress import Progress
from models import tiny


@dataclasses.dataclass
class _State:
    log: list = dataclasses.field(default_factory=list)
    results: list = dataclasses.field(default_factory=list)
    broken: bool = False


class _Append(PassBase):
    def __init__(self, name, runs=True):
        self.name, self.runs = name, runs

    def applies(self, state):
        return self.runs

    def call(self, state):
        state.log.append(self.name)
        return PassResult(self.name, True, {self.name: len(state.log)})

    def ensures(self, state, result):
        if state.broken:
            self.fail("the state is broken")


def test_manager_runs_in_order_skips_what_does_not_apply_and_stops_until():
    pm = PassManager([_Append("a"), _Append("b", runs=False), _Append("c"), _Append("d")])
    st = _State()
    results = pm.run(st, Progress(False), until="c")
    assert st.log == ["a", "c"] and [r.name for r in results] == ["a", "c"]
    assert [r.report for r in st.results] == [{"a": 1}, {"c": 2}]


def test_failed_postcondition_names_the_pass():
    with pytest.raises(PassError, match=r"^pass a: the state is broken$"):
        PassManager([_Append("a")]).run(_State(broken=True), Progress(False))


def test_names_are_unique_and_until_must_exist():
    with pytest.raises(ValueError):
        PassManager([_Append("a"), _Append("a")])
    with pytest.raises(ValueError, match="no pass 'z'"):
        PassManager([_Append("a")]).run(_State(), Progress(False), until="z")


def test_the_pipeline_is_one_pass_list():
    assert pipeline.PIPELINE.names() == ["drop experts", "capture", "analysis", "capture decoder", "eval dense",
                                         "logit reference", "export dense", "select", "greedy reconstruction",
                                         "dense template", "rewrite", "rewrite decoder"]
    assert pipeline.OUTPUT.names() == ["export", "verify", "serving files", "checkpoint", "eval pruned", "logit error",
                                       "latency", "gates", "report"]


def _captured(family="llama-gqa"):
    from goa_compiler.analysis import analyze_graph
    from goa_compiler.capture.torch_export import capture
    from goa_compiler.frontends.fx import FxFrontend

    model, _, kind = tiny.build(family)
    cap = capture(model, kind)
    return cap, analyze_graph(FxFrontend(cap.gm).view())


def test_rewrite_postcondition_catches_a_shape_constant_left_unset(monkeypatch):
    """If the frontend failed to set the head counts, the rewrite pass says so (by name)
    instead of exporting a graph whose reshapes no longer match its weights."""
    from goa_compiler.frontends.fx import FxFrontend

    cap, analysis = _captured()
    monkeypatch.setattr(FxFrontend, "set_ints", lambda self, node, attr, values: None)
    opts = CompileOptions(ratio=0.5, criterion="magnitude", reconstruct="none")
    with pytest.raises(PassError, match=r"^pass rewrite: shape constant IntHandle\(node='"):
        pipeline.prune_captured(dataclasses.replace(cap, gm=copy.deepcopy(cap.gm)), analysis, opts, None,
                                Progress(False))


def test_prune_captured_stops_after_the_rewrite_and_records_what_ran():
    cap, analysis = _captured()
    opts = CompileOptions(ratio=0.5, criterion="random", reconstruct="none", seed=1)
    st = pipeline.prune_captured(dataclasses.replace(cap, gm=copy.deepcopy(cap.gm)), analysis, opts, None,
                                 Progress(False))
    assert [r.name for r in st.results] == ["select", "rewrite"]
    assert st.rewritten.params_after < st.rewritten.params_before
    assert set(st.plan.modules) == {s.name for s in analysis.structures}
