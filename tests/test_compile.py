"""torch.compile serves several tasks with no graph break inside the backbone, at most one compilation per task, and
the cached effective weights (issue 16, item 4). Dynamo with the eager backend: what is traced, not how fast."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import timm
import timm_modcl


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()
    m.add_task('a', 3)
    m.add_task('b', 5)
    with torch.no_grad():
        for t in ('a', 'b'):
            for p in m.modcl_tasks[t].modulators.values():
                p.normal_(0, 0.1)
    return m


def test_compiled_model_serves_tasks_with_one_graph_each_and_equal_outputs(model):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    ref = {t: model.forward_task(x, t) for t in ('a', 'b')}
    counter, graphs = CompileCounter(), []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return counter(gm, example_inputs)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for i, t in enumerate(('a', 'b', 'a', 'b')):
            model.set_task(t)
            assert torch.equal(compiled(x), ref[t]), t
            # one graph per task (a graph break would add frames per call), none on switching back
            assert counter.frame_count == min(i + 1, 2)
    # the graphs compute no effective weight (the modulation's upsampling products and addcmul): they take the
    # cached weights as inputs, one per modulated layer
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ('call_function', 'call_method')}
    assert not {t for t in targets if 'addcmul' in t or 'matmul' in t}, targets
    assert sum('conv2d' in str(n.target) for n in graphs[0].graph.nodes) == len(model.modulated_layers)


def test_compiled_model_sees_a_training_step(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager')
    x = torch.randn(2, 3, 32, 32)
    model.set_task('a')
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    compiled(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), model.forward_task(x, 'a'))   # refreshed, not a stale cached weight


def test_task_scope_on_a_compiled_call_is_refused(model):
    torch._dynamo.reset()
    model.compile(backend='eager')
    try:
        with torch.no_grad(), model.task_scope('b'):
            with pytest.raises(timm_modcl.UnsupportedModelError, match='set_task'):
                model(torch.randn(2, 3, 32, 32))
    finally:
        model._compiled_call_impl = None
